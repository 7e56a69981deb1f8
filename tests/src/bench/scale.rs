//! Cost of a post as the deployment grows: with its author's followers in
//! two other clusters, a post must cost the same deliveries (events sent to
//! other clusters) and remote applies whether the deployment has 3, 6 or 12
//! clusters — posts go only where they are read. Counted from every
//! server's own numbers (`Replica.Status.sent_events`, `.received_events`)
//! before and after the author posts.

use crate::load;
use crate::{Deployment, DeploymentBuilder};
use anyhow::{Context, Result, anyhow, bail};
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{StatusRequest, TableRequest};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// One deployment size's figures.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub clusters: u32,
    pub posts: usize,
    /// Events other clusters were sent, per post.
    pub deliveries_per_post: f64,
    /// Events applied in other clusters, per post.
    pub remote_applies_per_post: f64,
}

/// Sum of (sent, received) events over every live server.
async fn counters(coord_port: u16) -> Result<(u64, u64)> {
    let mut admin = CoordAdminClient::new(super::grpc::node_channel(&format!("127.0.0.1:{coord_port}"))?);
    let nodes = admin.table(TableRequest {}).await?.into_inner().nodes;
    let (mut sent, mut received) = (0, 0);
    for n in nodes.iter().filter(|n| n.kind == "server" && n.alive) {
        let mut c = ReplicaClient::new(super::grpc::node_channel(&format!("{}:{}", n.host, n.port))?);
        let s = c.status(StatusRequest {}).await?.into_inner();
        sent += s.sent_events;
        received += s.received_events;
    }
    Ok((sent, received))
}

/// The counters once two reads 100 ms apart agree (nothing in flight), or
/// at the deadline.
async fn settled(port: u16, deadline: Instant) -> Result<(u64, u64)> {
    let mut last = counters(port).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counters(port).await?;
        if now == last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Measures one deployment of `clusters` clusters of one server: user 1
/// (cluster 1) posts `posts` times; users 2 and 3 (clusters 2 and 3)
/// follow it.
pub async fn measure(builder: DeploymentBuilder, clusters: u32, posts: usize, budget: Duration) -> Result<Scale> {
    if clusters < 3 {
        bail!("the scale measure needs at least 3 clusters");
    }
    let d: Deployment = tokio::task::block_in_place(|| builder.clusters(clusters).servers(1).start())
        .with_context(|| format!("starting {clusters} clusters"))?;
    let port = d.coord_port;
    let deadline = Instant::now() + budget;
    for u in [1, 2, 3] {
        load::attach(port, u).await?;
    }
    for f in [2, 3] {
        let mut msg = String::new();
        while msg != "SUCCESS" && Instant::now() < deadline {
            msg = load::command(port, f, true, 1, deadline).await?;
        }
    }
    load::wait_followers(port, 1, &[2, 3], deadline).await?;
    // Logins and follows have settled: count from here.
    let before = settled(port, deadline).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let written = load::writer(port, 1, stop, posts, deadline).await;
    if written.acked.len() != posts {
        bail!("{} of {posts} posts acknowledged within {budget:?}", written.acked.len());
    }
    // Both followers' clusters applied every post.
    let want = before.1 + 2 * posts as u64;
    let after = loop {
        let c = counters(port).await?;
        if c.1 >= want {
            break settled(port, deadline).await?;
        }
        if Instant::now() > deadline {
            return Err(anyhow!("{} of {} remote applies after {budget:?}", c.1 - before.1, 2 * posts));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::task::block_in_place(|| drop(d));
    let n = posts as f64;
    Ok(Scale {
        clusters,
        posts,
        deliveries_per_post: (after.0 - before.0) as f64 / n,
        remote_applies_per_post: (after.1 - before.1) as f64 / n,
    })
}
