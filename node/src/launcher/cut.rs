//! Cuts between two servers (`partition <server> <server>`): nftables rules
//! that drop every packet between the two, both ways, while each still
//! reaches the coordinator and its clients still reach it. The launcher
//! starts every server with its own connections leaving from a loopback
//! address of its own ([`source_address`]), so a rule can tell a server's
//! connection to its peer from a client's.
//!
//! Dropped, not refused: bytes stop both ways, open connections stay open
//! and new ones hang in their handshake, as in a dropped-packet partition.
//! It needs root and the `nft` command. The rules live in a table of this
//! launcher's own (`tinysns_<pid>`), deleted when it stops; a table left by
//! a launcher that died is deleted by the next one that starts.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// One side of a cut: the address a server's own connections leave from,
/// and the port it serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct End {
    pub source: Ipv4Addr,
    pub port: u16,
}

/// The pairs of servers cut from each other.
pub struct Cuts {
    table: String,
    pairs: BTreeSet<(End, End)>,
}

/// The loopback address server (`cluster`, `id`)'s own connections leave
/// from: 127.1.<cluster>.<id>, if this machine lets a socket bind it.
pub fn source_address(cluster: u32, id: u32) -> Option<Ipv4Addr> {
    let ip = Ipv4Addr::new(127, 1, u8::try_from(cluster).ok()?, u8::try_from(id).ok()?);
    std::net::TcpListener::bind((ip, 0)).ok().map(|_| ip)
}

impl Cuts {
    pub fn new() -> Cuts {
        Cuts { table: format!("tinysns_{}", std::process::id()), pairs: BTreeSet::new() }
    }

    /// Cuts `a` and `b` off from each other (false: they already were).
    pub fn cut(&mut self, a: End, b: End) -> Result<bool, String> {
        let pair = ordered(a, b);
        if self.pairs.contains(&pair) {
            return Ok(false);
        }
        self.pairs.insert(pair);
        self.apply().inspect_err(|_| {
            self.pairs.remove(&pair);
        })?;
        Ok(true)
    }

    /// Ends the cut between `a` and `b` (false: there was none).
    pub fn heal(&mut self, a: End, b: End) -> Result<bool, String> {
        let pair = ordered(a, b);
        if !self.pairs.remove(&pair) {
            return Ok(false);
        }
        self.apply().inspect_err(|_| {
            self.pairs.insert(pair);
        })?;
        Ok(true)
    }

    /// Ends every cut (the launcher is stopping).
    pub fn clear(&mut self) {
        if !self.pairs.is_empty() {
            self.pairs.clear();
            if let Err(e) = self.apply() {
                tracing::warn!(table = %self.table, error = %e, "could not delete the cuts' nftables table");
            }
        }
    }

    fn apply(&self) -> Result<(), String> {
        nft(&script(&self.table, &self.pairs))
    }
}

fn ordered(a: End, b: End) -> (End, End) {
    if a <= b { (a, b) } else { (b, a) }
}

/// Replaces the table with one holding `pairs`' rules (none: deletes it).
/// Declaring the table first makes the deletion succeed when it is absent.
fn script(table: &str, pairs: &BTreeSet<(End, End)>) -> String {
    let mut s = format!("table inet {table}\ndelete table inet {table}\n");
    if pairs.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "table inet {table} {{\n  chain out {{\n    type filter hook output priority filter; policy accept;\n"
    ));
    for (a, b) in pairs {
        for (from, to) in [(a, b), (b, a)] {
            // `from`'s connections to `to`, and `to`'s answers on them.
            s.push_str(&format!("    ip saddr {} tcp dport {} drop\n", from.source, to.port));
            s.push_str(&format!("    ip daddr {} tcp sport {} drop\n", from.source, to.port));
        }
    }
    s.push_str("  }\n}\n");
    s
}

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft ({e}): cutting servers apart needs nftables and root"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed ({}): {}; cutting servers apart needs nftables and root",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the tables of launchers that died without deleting theirs: left
/// behind, their rules would cut a later deployment given the same ports.
pub fn sweep_stale() {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).stderr(Stdio::null()).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(pid) = line.strip_prefix("table inet tinysns_") else { continue };
        if pid.parse::<u32>().is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let table = format!("tinysns_{pid}");
            match nft(&format!("delete table inet {table}\n")) {
                Ok(()) => tracing::info!(%table, "deleted the cuts of a launcher that is gone"),
                Err(e) => tracing::warn!(%table, error = %e, "could not delete a gone launcher's cuts"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(last: u8, port: u16) -> End {
        End { source: Ipv4Addr::new(127, 1, 1, last), port }
    }

    #[test]
    fn a_cut_drops_both_servers_connections_to_each_other_and_their_answers() {
        let pairs = BTreeSet::from([ordered(end(2, 9012), end(1, 9011))]);
        let s = script("tinysns_7", &pairs);
        assert!(s.starts_with("table inet tinysns_7\ndelete table inet tinysns_7\n"), "{s}");
        for rule in [
            "ip saddr 127.1.1.1 tcp dport 9012 drop",
            "ip daddr 127.1.1.1 tcp sport 9012 drop",
            "ip saddr 127.1.1.2 tcp dport 9011 drop",
            "ip daddr 127.1.1.2 tcp sport 9011 drop",
        ] {
            assert_eq!(s.matches(rule).count(), 1, "{rule} in {s}");
        }
        // Nothing else is dropped: clients and the coordinator's traffic pass.
        assert_eq!(s.matches(" drop").count(), 4, "{s}");
    }

    #[test]
    fn with_no_cut_left_the_table_is_deleted() {
        assert_eq!(script("t", &BTreeSet::new()), "table inet t\ndelete table inet t\n");
    }

    #[test]
    fn each_server_gets_a_loopback_address_of_its_own() {
        assert_eq!(source_address(2, 1), Some(Ipv4Addr::new(127, 1, 2, 1)));
        assert_ne!(source_address(1, 2), source_address(2, 1));
        assert_eq!(source_address(256, 1), None);
    }
}
