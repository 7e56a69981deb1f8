//! Ports for the processes of a launcher started with `--base-port 0`.
//!
//! A port the OS picks (port 0) comes from the ephemeral range, which every
//! outgoing connection and every other port-0 listener on the machine draw
//! from too, and it is free again the moment its process stops. The
//! launcher keeps a node's port across restarts (clients, the routing table
//! and `partition` cuts know it by that port), so a node restarted after a
//! stop could find its port taken meanwhile and fail to start.
//!
//! So the launcher reserves ports itself, below the ephemeral range, where
//! neither outgoing connections nor port-0 listeners ever land. Ports go in
//! blocks of [`BLOCK`]; a launcher claims a block with an exclusive `flock`
//! on `<tmp>/sns-ports/<first port>`, held as long as it runs (the kernel
//! drops it when the launcher exits, however that happens, so nothing stale
//! is left), and hands out only ports of its blocks that it could bind
//! itself a moment before (something else may listen there).

use std::fs::{File, OpenOptions, TryLockError};
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::path::Path;

/// Ports per claimed block.
pub const BLOCK: u16 = 64;

/// Below this, ports are left to the services that are configured on them.
const LOWEST: u16 = 20_000;

/// Ports held for this launcher: its blocks stay claimed while this lives.
#[derive(Debug)]
pub struct Reserved {
    pub ports: Vec<u16>,
    /// The claimed blocks' locks: held, never read.
    locks: Vec<File>,
}

/// Reserves `count` ports free on 127.0.0.1, or says why it could not.
pub fn reserve(count: usize) -> Result<Reserved, String> {
    let dir = std::env::temp_dir().join("sns-ports");
    let range = LOWEST..ephemeral_low().unwrap_or(32_768);
    reserve_in(&dir, range, count, start_hint())
}

/// The first port of the machine's ephemeral range.
pub fn ephemeral_low() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Where to start looking: launchers starting at the same moment then
/// rarely try the same block first.
fn start_hint() -> usize {
    let mut bytes = [0u8; 4];
    let random = getrandom::fill(&mut bytes).map(|()| u32::from_le_bytes(bytes)).unwrap_or_else(|_| std::process::id());
    random as usize
}

/// [`reserve`] in `dir` over `range`, trying blocks from the `start`-th on.
fn reserve_in(dir: &Path, range: Range<u16>, count: usize, start: usize) -> Result<Reserved, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let blocks: Vec<u16> = range.clone().step_by(BLOCK as usize).collect();
    if blocks.is_empty() {
        return Err(format!("no ports between {} and {}", range.start, range.end));
    }
    let mut got = Reserved { ports: Vec::with_capacity(count), locks: Vec::new() };
    for k in 0..blocks.len() {
        if got.ports.len() >= count {
            break;
        }
        let first = blocks[(start + k) % blocks.len()];
        let Some(lock) = claim(&dir.join(first.to_string()))? else { continue };
        let end = first.saturating_add(BLOCK).min(range.end);
        let free: Vec<u16> = (first..end).filter(|p| is_free(*p)).take(count - got.ports.len()).collect();
        if !free.is_empty() {
            got.ports.extend(free);
            got.locks.push(lock);
        }
    }
    if got.ports.len() < count {
        return Err(format!(
            "only {} of {count} free ports between {} and {} are not claimed by another launcher",
            got.ports.len(),
            range.start,
            range.end
        ));
    }
    Ok(got)
}

/// The block's lock, or None when another launcher holds it. Never
/// through a symbolic link: the directory may be shared with other users.
fn claim(path: &Path) -> Result<Option<File>, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
    }
}

/// Nothing listens on (or is bound to) 127.0.0.1:`port` right now.
fn is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn two_launchers_never_share_a_port_and_a_stopped_ones_ports_come_back() {
        let dir = dir();
        let range = 20_000..20_000 + 4 * BLOCK;
        let a = reserve_in(dir.path(), range.clone(), 70, 0).unwrap();
        let b = reserve_in(dir.path(), range.clone(), 70, 0).unwrap();
        assert_eq!(a.ports.len(), 70);
        assert_eq!(b.ports.len(), 70);
        assert!(a.ports.iter().all(|p| !b.ports.contains(p)), "{:?} and {:?} overlap", a.ports, b.ports);
        assert!(a.ports.iter().chain(&b.ports).all(|p| range.contains(p)));
        // All four blocks are claimed now.
        let err = reserve_in(dir.path(), range.clone(), 1, 0).unwrap_err();
        assert!(err.contains("not claimed by another launcher"), "{err}");
        drop(a);
        let c = reserve_in(dir.path(), range, 1, 0).unwrap();
        assert_eq!(c.ports.len(), 1);
        assert!(!b.ports.contains(&c.ports[0]));
    }

    #[test]
    fn a_port_something_listens_on_is_not_handed_out() {
        let dir = dir();
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let range = port..port.saturating_add(8);
        let got = reserve_in(dir.path(), range, 1, 0).unwrap();
        assert_ne!(got.ports[0], port);
        assert!(is_free(got.ports[0]));
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_not_followed() {
        let dir = dir();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join("20000")).unwrap();
        let err = reserve_in(dir.path(), 20_000..20_000 + BLOCK, 1, 0).unwrap_err();
        assert!(err.contains("20000"), "{err}");
        assert!(!target.exists(), "nothing made through the link");
    }

    #[test]
    fn the_ports_are_below_the_ephemeral_range() {
        let low = ephemeral_low().unwrap_or(32_768);
        let got = reserve(8).unwrap();
        assert!(got.ports.iter().all(|p| (LOWEST..low).contains(p)), "{:?}", got.ports);
    }
}
