//! Safe scale-down: which server StatefulSets that the spec no longer
//! wants may go now.
//!
//! A server is removed only when a server that stays in its cluster is
//! live and recorded in sync by the coordinator (holds every acknowledged
//! write): removing the only such server would lose writes, or leave the
//! cluster with nobody the coordinator may promote. A server that is master
//! first hands its role to that server (a planned switchover) and is
//! removed at a later poll, once it is a slave. While a removal waits, the
//! StatefulSet stays and the status says why.
//!
//! Pure, so the rules are unit-tested; the controller's prune acts on them.

use crate::coordinator::{NodeKind, NodeView};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Delete it now.
    Remove,
    /// It is master: hand the role to this staying server first.
    SwitchFirst { to: u32 },
    /// Not now (why).
    Keep(String),
}

/// May server `server` of `cluster` go, now that each cluster keeps
/// servers 1..=`keep`? `table` is the coordinator's routing table (None:
/// it does not answer).
pub fn removal(table: Option<&[NodeView]>, cluster: u32, server: u32, keep: u32) -> Removal {
    let Some(table) = table else {
        return Removal::Keep(format!(
            "server {cluster}/{server} stays until the coordinator answers (it must tell who holds every write)"
        ));
    };
    let servers = || table.iter().filter(move |n| n.kind == NodeKind::Server && n.cluster == cluster);
    let heir = servers().filter(|n| n.id <= keep && n.alive && n.in_sync).min_by_key(|n| n.id);
    let Some(heir) = heir else {
        return Removal::Keep(format!(
            "server {cluster}/{server} stays: no server that cluster {cluster} keeps is live and in sync, so it may hold the only copy of acknowledged writes"
        ));
    };
    let is_master = servers().any(|n| n.id == server && n.alive && n.is_master);
    if is_master { Removal::SwitchFirst { to: heir.id } } else { Removal::Remove }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::healthy_table;

    #[test]
    fn a_slave_goes_when_the_staying_server_holds_every_write() {
        let t = healthy_table(2, 2);
        assert_eq!(removal(Some(&t), 1, 2, 1), Removal::Remove);
        // The staying server is master, the leaving one dead: it goes too.
        let mut t = healthy_table(2, 2);
        t[1].alive = false;
        t[1].in_sync = false;
        assert_eq!(removal(Some(&t), 1, 2, 1), Removal::Remove);
    }

    #[test]
    fn a_master_hands_its_role_over_first() {
        let mut t = healthy_table(2, 2);
        t[2].is_master = false;
        t[3].is_master = true;
        assert_eq!(removal(Some(&t), 2, 2, 1), Removal::SwitchFirst { to: 1 });
        assert_eq!(removal(Some(&t), 1, 2, 1), Removal::Remove, "cluster 1's server 2 is a slave");
    }

    #[test]
    fn the_only_live_in_sync_server_stays() {
        // Cluster 1's master is server 2 and server 1 is behind (or dead):
        // removing server 2 would lose what only it holds.
        let mut t = healthy_table(2, 2);
        t[0].is_master = false;
        t[0].in_sync = false;
        t[1].is_master = true;
        let Removal::Keep(why) = removal(Some(&t), 1, 2, 1) else { panic!("removed") };
        assert!(why.contains("no server that cluster 1 keeps is live and in sync"), "{why}");
        t[0].in_sync = true;
        t[0].alive = false;
        assert!(matches!(removal(Some(&t), 1, 2, 1), Removal::Keep(_)), "dead is no heir either");
        // Without the coordinator nobody knows: it stays.
        assert!(matches!(removal(None, 1, 2, 1), Removal::Keep(ref w) if w.contains("coordinator answers")));
    }
}
