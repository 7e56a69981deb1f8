//! The routing table as people read it: `sns-node status` and the local
//! launcher's `status` print it. One row per node the coordinator knows,
//! with what each live master says of its outbox (`Replica.Status`).

use crate::auth::Attach;
use crate::error::{Error, Result};
use crate::net;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{Node, StatusRequest, TableRequest};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one server gets to answer `Status`: a paused one must not hold
/// the table up, it shows `?` instead.
const STATUS_PATIENCE: Duration = Duration::from_millis(500);

/// The coordinator's table, plus each live master's outbox backlog (events
/// committed and not yet confirmed by the broker), by cluster.
pub struct Snapshot {
    pub nodes: Vec<Node>,
    pub backlog: BTreeMap<u32, u64>,
}

/// Asks the coordinator at `host:port` for its table, then each live master
/// for its outbox.
pub async fn fetch(host: &str, port: u16, attach: &Attach) -> Result<Snapshot> {
    let channel = net::node_channel(host, &port.to_string(), attach)?;
    let nodes = CoordAdminClient::new(channel)
        .table(TableRequest {})
        .await
        .map_err(|s| Error::Other(format!("the coordinator at {host}:{port} refused: {}", s.message())))?
        .into_inner()
        .nodes;
    let asks = nodes.iter().filter(|n| n.kind == "server" && n.alive && n.is_master).map(|n| async move {
        let mut client = ReplicaClient::new(net::node_channel(&n.host, &n.port, attach).ok()?);
        let s = tokio::time::timeout(STATUS_PATIENCE, client.status(StatusRequest {})).await.ok()?.ok()?.into_inner();
        Some((n.cluster, s.next_seq.saturating_sub(1).saturating_sub(s.published_upto)))
    });
    let backlog = futures_util::future::join_all(asks).await.into_iter().flatten().collect();
    Ok(Snapshot { nodes, backlog })
}

/// The launcher's name of a node: `server-<c>-<id>`, `sync-<c>-<paired>`.
pub fn name(n: &Node) -> String {
    if n.kind == "server" {
        format!("server-{}-{}", n.cluster, n.id)
    } else {
        format!("sync-{}-{}", n.cluster, n.paired_server)
    }
}

/// A node's role in words.
fn role(n: &Node) -> &'static str {
    match (n.alive, n.kind.as_str(), n.is_master) {
        (false, _, _) => "dead",
        (true, "server", true) => "master",
        (true, "server", false) => "slave",
        _ => "sync",
    }
}

/// What is wrong with a live node, as it says in its heartbeats.
fn problem(n: &Node) -> Option<String> {
    if !n.alive {
        return None;
    }
    if n.kind == "server" {
        if n.damaged {
            return Some("its journal is damaged: it waits to be rebuilt from an in-sync server".into());
        }
        if n.unwritable {
            return Some("cannot write its journal (full, failing or hung disk): it takes no writes".into());
        }
        return (!n.waits.is_empty()).then(|| format!("named master, serves nothing yet: {}", n.waits));
    }
    (!n.link_down.is_empty()).then(|| format!("link to its server or the broker down: {}", n.link_down))
}

/// An extra column: its header, and its cell for a node's name.
pub type Column<'a> = (&'a str, &'a dyn Fn(&str) -> String);

/// The aligned table; `extra` adds columns after the fixed ones, by node
/// name (the launcher's pids and metrics ports). Below it, one line per
/// live node with a problem (none while all is well).
pub fn render(s: &Snapshot, extra: &[Column<'_>]) -> String {
    let mut nodes: Vec<&Node> = s.nodes.iter().collect();
    nodes.sort_by_key(|n| (n.cluster, n.kind != "server", n.id));
    let mut rows: Vec<Vec<String>> = vec![
        ["CLUSTER", "NODE", "ROLE", "TERM", "IN-SYNC", "LAST-BEAT", "BACKLOG", "ADDRESS"]
            .iter()
            .map(|h| h.to_string())
            .chain(extra.iter().map(|(h, _)| h.to_string()))
            .collect(),
    ];
    let mut problems = Vec::new();
    for n in nodes {
        let server = n.kind == "server";
        // The backlog is the publishing synchronizer's: the one beside the master.
        let publishing = !server
            && s.nodes.iter().any(|m| {
                m.kind == "server" && m.alive && m.is_master && m.cluster == n.cluster && m.id == n.paired_server
            });
        let backlog = match (publishing, s.backlog.get(&n.cluster)) {
            (true, Some(b)) => b.to_string(),
            (true, None) => "?".into(),
            (false, _) => "-".into(),
        };
        let name = name(n);
        let mut row = vec![
            n.cluster.to_string(),
            name.clone(),
            role(n).into(),
            if server { n.term.to_string() } else { "-".into() },
            match (server, n.in_sync) {
                (false, _) => "-".into(),
                (true, true) => "yes".into(),
                (true, false) => "no".into(),
            },
            format!("{}ms", n.last_seen_ms),
            backlog,
            format!("{}:{}", n.host, n.port),
        ];
        row.extend(extra.iter().map(|(_, f)| f(&name)));
        rows.push(row);
        if let Some(p) = problem(n) {
            problems.push(format!("  {name}: {p}"));
        }
    }
    let mut text = align(&rows);
    if !problems.is_empty() {
        text.push_str("problems:\n");
        for p in problems {
            text.push_str(&p);
            text.push('\n');
        }
    }
    text
}

/// Left-aligned columns two spaces apart, no trailing blanks.
fn align(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `sns-node status`: prints the table.
#[allow(clippy::print_stdout, reason = "a command-line tool's answer goes to stdout")]
pub async fn print(args: &crate::cli::StatusArgs) -> Result<()> {
    let attach = Attach::new(args.secret.load()?);
    let snapshot = fetch(&args.coord.coord_host, args.coord.coord_port, &attach).await?;
    print!("{}", render(&snapshot, &[]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cluster: u32, id: u32, kind: &str, master: bool, paired: u32) -> Node {
        Node {
            cluster,
            id,
            host: "127.0.0.1".into(),
            port: format!("90{cluster}{id}"),
            kind: kind.into(),
            alive: true,
            is_master: master,
            term: 3,
            paired_server: paired,
            last_seen_ms: 12,
            in_sync: master,
            ..Node::default()
        }
    }

    #[test]
    fn the_table_is_aligned_and_names_roles() {
        let s = Snapshot {
            nodes: vec![
                node(1, 2, "server", false, 0),
                node(1, 1, "server", true, 0),
                node(1, 1, "synchronizer", false, 1),
                node(1, 3, "synchronizer", false, 2),
            ],
            backlog: BTreeMap::from([(1, 7)]),
        };
        let text = render(&s, &[("PID", &|n: &str| format!("pid-of-{n}"))]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("CLUSTER  NODE"), "{text}");
        assert!(lines[1].contains("server-1-1") && lines[1].contains("master") && lines[1].contains("yes"));
        assert!(lines[2].contains("server-1-2") && lines[2].contains("slave") && lines[2].contains(" no "));
        // The synchronizer beside the master carries the backlog.
        assert!(lines[3].contains("sync-1-1") && lines[3].contains(" 7 ") && lines[3].ends_with("pid-of-sync-1-1"));
        let col = lines[0].find("ADDRESS").unwrap();
        assert!(lines.iter().skip(1).all(|l| l[col..].starts_with("127.0.0.1:")), "{text}");
    }

    #[test]
    fn problems_of_live_nodes_are_listed_below_the_table() {
        let mut down = node(1, 3, "synchronizer", false, 2);
        down.link_down = "IO error: Connection refused (os error 111)".into();
        let mut full = node(1, 2, "server", false, 0);
        full.unwritable = true;
        let mut dead = node(1, 1, "synchronizer", false, 1);
        (dead.alive, dead.link_down) = (false, "stale".into());
        let mut waiting = node(1, 1, "server", true, 0);
        waiting.waits = "server 1 of cluster 1 waits for in-sync servers [2]".into();
        let s = Snapshot { nodes: vec![waiting, full, dead, down], backlog: BTreeMap::new() };
        let text = render(&s, &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 4 + 4, "{text}");
        assert_eq!(lines[5], "problems:", "{text}");
        assert_eq!(
            lines[6],
            "  server-1-1: named master, serves nothing yet: server 1 of cluster 1 waits for in-sync servers [2]",
            "{text}"
        );
        assert!(lines[7].starts_with("  server-1-2: cannot write its journal"), "{text}");
        assert_eq!(
            lines[8], "  sync-1-2: link to its server or the broker down: IO error: Connection refused (os error 111)",
            "{text}"
        );
        // All well: the table alone.
        let well = Snapshot { nodes: vec![node(1, 1, "server", true, 0)], backlog: BTreeMap::new() };
        assert!(!render(&well, &[]).contains("problems"));
    }
}
