//! The launcher's console: its commands, one line of help each, and the
//! failover announcements it prints as they happen.
//!
//! Announcements come from watching the coordinator's routing table (every
//! [`WATCH_EVERY`]): a cluster whose master changed is announced with how
//! long after the launcher killed, stopped, paused or partitioned the old
//! master (or saw it exit) the new one showed up there. The time is the
//! launcher's view, so it is exact to within one poll of the table.

use crate::auth::Attach;
use sns_proto::internal::Node;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::cli::{CONSOLE_COMMANDS as COMMANDS, CONSOLE_NAMES as NAMES, console_help as help};

/// The start-up hint: the commands on one line.
pub fn hint() -> String {
    let cmds: Vec<&str> = COMMANDS.iter().map(|(c, _)| *c).collect();
    format!("commands: {}  ({NAMES})", cmds.join(" | "))
}

/// The answer to a command the console does not know.
pub fn unknown(verb: &str) -> String {
    format!("unknown command: {verb} (help lists the commands)")
}

/// How often the table is read for failovers: a failover takes a lease
/// (1 s by default) or more, so 50 ms is fine-grained, and one `Table`
/// call on loopback costs well under a millisecond.
pub const WATCH_EVERY: Duration = Duration::from_millis(50);

#[derive(Default)]
struct State {
    /// Per cluster: (term, master) as last seen.
    masters: BTreeMap<u32, (u64, u32)>,
    /// What the launcher did to a process, or saw happen to it, and when.
    gone: BTreeMap<String, (Instant, &'static str)>,
}

/// What the watcher and the console share: who was master, and what
/// happened to whom (no I/O under its lock).
#[derive(Clone, Default)]
pub struct Failovers(Arc<Mutex<State>>);

impl Failovers {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records that `name` went away (`what`: "died", "was paused", ...).
    pub fn gone(&self, name: &str, what: &'static str) {
        self.with(|s| {
            s.gone.entry(name.to_string()).or_insert((Instant::now(), what));
        });
    }

    /// `name` is back (started, resumed, healed).
    pub fn back(&self, name: &str) {
        self.with(|s| s.gone.remove(name));
    }

    /// Compares `nodes` with the masters seen before; returns one line per
    /// cluster whose master changed, and sends them on `tx` too if given
    /// (under the lock, so no line is both returned to one caller and
    /// still on its way from another).
    fn note(&self, nodes: &[Node], tx: Option<&mpsc::UnboundedSender<String>>) -> Vec<String> {
        self.with(|s| {
            let mut lines = Vec::new();
            for n in nodes.iter().filter(|n| n.kind == "server" && n.alive && n.is_master) {
                let before = s.masters.insert(n.cluster, (n.term, n.id));
                let Some((old_term, old)) = before else { continue };
                if old_term >= n.term && old == n.id {
                    continue;
                }
                if old_term > n.term {
                    // An older view (a table read before the last one).
                    s.masters.insert(n.cluster, (old_term, old));
                    continue;
                }
                let line = match s.gone.get(&format!("server-{}-{old}", n.cluster)) {
                    Some((at, what)) if old != n.id => format!(
                        "cluster {}: server {} promoted, term {}, {} ms after server {old} {what}",
                        n.cluster,
                        n.id,
                        n.term,
                        at.elapsed().as_millis()
                    ),
                    _ if old != n.id => {
                        format!(
                            "cluster {}: server {} promoted, term {} (server {old} was master)",
                            n.cluster, n.id, n.term
                        )
                    }
                    _ => format!("cluster {}: server {} master again, term {}", n.cluster, n.id, n.term),
                };
                if let Some(tx) = tx {
                    let _ = tx.send(line);
                } else {
                    lines.push(line);
                }
            }
            lines
        })
    }

    /// Reads the table once and returns what changed since (for the
    /// console, before it answers a command that may have changed it).
    pub async fn check(&self, coord_port: u16, attach: &Attach) -> Vec<String> {
        match table(coord_port, attach).await {
            Some(nodes) => self.note(&nodes, None),
            None => Vec::new(),
        }
    }

    /// Watches the table until `shutdown`, sending each announcement.
    pub async fn watch(
        self,
        coord_port: u16,
        attach: Attach,
        tx: mpsc::UnboundedSender<String>,
        shutdown: CancellationToken,
    ) {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            if let Some(nodes) = table(coord_port, &attach).await {
                self.note(&nodes, Some(&tx));
            }
        }
    }
}

async fn table(coord_port: u16, attach: &Attach) -> Option<Vec<Node>> {
    let channel = crate::net::node_channel("127.0.0.1", &coord_port.to_string(), attach).ok()?;
    let mut admin = CoordAdminClient::new(channel);
    // A paused coordinator must not stall the watcher for a whole call timeout.
    let reply = tokio::time::timeout(Duration::from_secs(1), admin.table(sns_proto::internal::TableRequest {}))
        .await
        .ok()?
        .ok()?;
    Some(reply.into_inner().nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(cluster: u32, id: u32, term: u64) -> Node {
        Node { cluster, id, kind: "server".into(), alive: true, is_master: true, term, ..Node::default() }
    }

    #[test]
    fn a_new_master_is_announced_once_with_the_old_ones_fate() {
        let f = Failovers::default();
        assert!(f.note(&[master(2, 1, 1)], None).is_empty(), "the first view is no change");
        f.gone("server-2-1", "died");
        let lines = f.note(&[master(2, 2, 2)], None);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("cluster 2: server 2 promoted, term 2, ")
                && lines[0].ends_with(" ms after server 1 died"),
            "{lines:?}"
        );
        assert!(f.note(&[master(2, 2, 2)], None).is_empty(), "announced once");
        let lines = f.note(&[master(2, 1, 3)], None);
        assert_eq!(lines, ["cluster 2: server 1 promoted, term 3 (server 2 was master)"]);
    }

    #[test]
    fn help_has_a_line_per_command() {
        let help = help();
        for (cmd, _) in COMMANDS {
            assert_eq!(help.lines().filter(|l| l.trim_start().starts_with(cmd)).count(), 1, "{cmd} in {help}");
        }
        assert!(hint().contains("pause <name>") && hint().contains("resume <name>"));
    }
}
