//! What the kernel says about the machine and the node processes: memory,
//! CPU time, the broker's process. Linux only (`/proc`).

use std::collections::BTreeMap;
use std::time::Instant;

/// `sysconf(_SC_CLK_TCK)`: the unit of the CPU times in `/proc/<pid>/stat`.
/// It is 100 on every Linux architecture we run on (USER_HZ), and reading it
/// through libc would need `unsafe`.
const CLK_TCK: f64 = 100.0;

/// The machine a run was measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kb: u64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_string());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            mem_total_kb: meminfo("MemTotal").unwrap_or(0),
        }
    }
}

fn meminfo(key: &str) -> Option<u64> {
    status_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    status_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS")
}

/// Memory of a process (KiB): resident total, anonymous (heap, stacks) and
/// file-backed (the mapped binary and libraries), and its thread count.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kb: u64,
    /// Proportional set size: shared pages (the binary's text, mapped by
    /// every node) divided among the processes sharing them.
    pub pss_kb: u64,
    pub anon_kb: u64,
    pub file_kb: u64,
    pub threads: u64,
}

pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss_kb: status_field(&status, "VmRSS")?,
        pss_kb: status_field(&rollup, "Pss").unwrap_or(0),
        anon_kb: status_field(&status, "RssAnon").unwrap_or(0),
        file_kb: status_field(&status, "RssFile").unwrap_or(0),
        threads: status_field(&status, "Threads").unwrap_or(0),
    })
}

/// The machine's busy percent (all cores) over `window`.
pub fn machine_busy(window: std::time::Duration) -> Option<f64> {
    let (b0, t0) = machine_ticks()?;
    std::thread::sleep(window);
    let (b1, t1) = machine_ticks()?;
    (t1 > t0).then(|| (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
}

/// User + system CPU time of a process so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count
    // from after the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) ticks of all CPUs since boot, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The pid of the RabbitMQ broker (the Erlang VM) on this machine, if any.
pub fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "beam.smp"))
}

/// CPU times of named processes and of the machine, at one instant.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    at: Instant,
    machine: Option<(u64, u64)>,
    procs: BTreeMap<String, (u32, u64)>,
}

impl CpuSnapshot {
    pub fn take(procs: &BTreeMap<String, u32>) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            machine: machine_ticks(),
            procs: procs.iter().filter_map(|(n, pid)| Some((n.clone(), (*pid, cpu_ticks(*pid)?)))).collect(),
        }
    }

    /// Percent of one core each process used between `self` and `later`,
    /// and the machine's busy percent (of all cores).
    pub fn usage(&self, later: &CpuSnapshot) -> (Option<f64>, BTreeMap<String, f64>) {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let machine = match (self.machine, later.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 * 100.0 / (t1 - t0) as f64),
            _ => None,
        };
        let procs = self
            .procs
            .iter()
            .filter_map(|(n, (pid, t0))| {
                let (pid1, t1) = later.procs.get(n)?;
                (pid1 == pid).then(|| (n.clone(), (t1 - t0) as f64 / CLK_TCK / secs * 100.0))
            })
            .collect();
        (machine, procs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kb(me).is_some_and(|kb| kb > 0));
        assert!(cpu_ticks(me).is_some());
        assert!(Machine::probe().nproc >= 1);
        assert_eq!(status_field("VmPeak:\t 10 kB\nVmRSS:\t  2048 kB\n", "VmRSS"), Some(2048));
    }
}

/// The servers' writer metrics summed over every server at one moment:
/// the difference of two tells how a phase's writes spent their time.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterSnapshot {
    wait_s: f64,
    writes: f64,
    cycle_s: f64,
    groups: f64,
    at: Option<Instant>,
}

impl WriterSnapshot {
    /// Scrapes every server of `ports` (name -> (port, metrics port)); a
    /// server that does not answer counts nothing.
    pub fn take(ports: &BTreeMap<String, (u16, u16)>) -> WriterSnapshot {
        let mut s = WriterSnapshot { at: Some(Instant::now()), ..WriterSnapshot::default() };
        for (_, (_, metrics)) in ports.iter().filter(|(name, _)| name.starts_with("server-")) {
            let Ok(m) = crate::metrics::scrape(*metrics).and_then(|t| crate::metrics::parse(&t)) else { continue };
            let get = |name: &str| crate::metrics::sum(&m, name, &[]).unwrap_or(0.0);
            s.wait_s += get("sns_commit_wait_seconds_sum");
            s.writes += get("sns_commit_wait_seconds_count");
            s.cycle_s += get("sns_commit_cycle_seconds_sum");
            s.groups += get("sns_commit_cycle_seconds_count");
        }
        s
    }

    /// From this snapshot to `later`: mean wait per write (ms), mean cycle
    /// (ms), groups per second, writes per group; None without a group.
    pub fn usage(&self, later: &WriterSnapshot) -> Option<WriterUsage> {
        let groups = later.groups - self.groups;
        let writes = later.writes - self.writes;
        let secs = later.at?.saturating_duration_since(self.at?).as_secs_f64();
        (groups > 0.0 && writes > 0.0 && secs > 0.0).then(|| WriterUsage {
            wait_mean_ms: (later.wait_s - self.wait_s) / writes * 1e3,
            cycle_mean_ms: (later.cycle_s - self.cycle_s) / groups * 1e3,
            groups_per_s: groups / secs,
            writes_per_group: writes / groups,
            busy_pct: (later.cycle_s - self.cycle_s) / secs * 100.0,
        })
    }
}

/// What [`WriterSnapshot::usage`] finds.
#[derive(Debug, Clone, Copy)]
pub struct WriterUsage {
    pub wait_mean_ms: f64,
    pub cycle_mean_ms: f64,
    pub groups_per_s: f64,
    pub writes_per_group: f64,
    /// Time spent in cycles over wall time, summed over the servers
    /// (100% = one writer always busy).
    pub busy_pct: f64,
}
