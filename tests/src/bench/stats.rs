//! Sample sets and their percentiles, and the monotonic clock every sample
//! is taken with.

use std::time::{Duration, Instant};

/// The bench's one time base: nanoseconds since the run started. Posts carry
/// their send time in this base in their text, so a receiver computes the
/// latency from one clock (no cross-process clock skew to correct).
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A set of measurements (in whatever unit the caller chose).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    values: Vec<f64>,
    sorted: bool,
}

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.values.push(v);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.values.sort_by(f64::total_cmp);
            self.sorted = true;
        }
    }

    /// Nearest-rank percentile (`p` in 0..=100): a value that was measured,
    /// never an interpolation between two.
    pub fn percentile(&mut self, p: f64) -> Option<f64> {
        if self.values.is_empty() {
            return None;
        }
        self.sort();
        let n = self.values.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.values[rank.clamp(1, n) - 1])
    }

    pub fn median(&mut self) -> Option<f64> {
        self.percentile(50.0)
    }

    pub fn max(&mut self) -> Option<f64> {
        self.percentile(100.0)
    }

    pub fn min(&mut self) -> Option<f64> {
        self.sort();
        self.values.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s = Samples::default();
        assert_eq!(s.median(), None);
        for v in (1..=100).rev() {
            s.push(f64::from(v));
        }
        assert_eq!(s.percentile(50.0), Some(50.0));
        assert_eq!(s.percentile(90.0), Some(90.0));
        assert_eq!(s.percentile(99.0), Some(99.0));
        assert_eq!(s.max(), Some(100.0));
        assert_eq!(s.min(), Some(1.0));
        assert_eq!(s.percentile(0.0), Some(1.0));
        let mut one = Samples::default();
        one.push(7.0);
        assert_eq!(one.percentile(99.0), Some(7.0));
    }
}
