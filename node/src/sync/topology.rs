//! Broker object names, routing keys and bindings.
//!
//! Everything is prefixed by the deployment name, so several deployments
//! (and parallel test runs) share one broker without seeing each other.
//! - `<dep>.events`: durable topic exchange every master synchronizer
//!   publishes to, with keys `user.<origin>`, `post.<origin>` and
//!   `rel.<followee's cluster>`;
//! - `<dep>.cluster.<c>`: one durable queue per cluster, bound to the
//!   users and posts of every other cluster and to relations aimed at
//!   cluster c. Only the synchronizer beside the cluster's master consumes
//!   it (the other stands by); `x-single-active-consumer` makes sure that,
//!   during a handover, one of them at a time gets deliveries;
//! - `<dep>.dead`: dead-letter exchange and queue for malformed messages.
//!
//! Every synchronizer declares the whole topology (it is idempotent), so no
//! event is dropped as unroutable because its receiver has not started yet.

use crate::error::Result;
use crate::ids::cluster_of;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use sns_proto::internal::SyncEvent;
use sns_proto::internal::sync_event::Kind;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub deployment: String,
    pub exchange: String,
    pub dead: String,
}

impl Names {
    pub fn new(deployment: &str) -> Names {
        Names {
            deployment: deployment.to_string(),
            exchange: format!("{deployment}.events"),
            dead: format!("{deployment}.dead"),
        }
    }

    /// The queue of `cluster`'s incoming events.
    pub fn queue(&self, cluster: u32) -> String {
        format!("{}.cluster.{cluster}", self.deployment)
    }
}

/// The routing key of an event.
pub fn routing_key(event: &SyncEvent, clusters: u32) -> String {
    match &event.kind {
        Some(Kind::User(_)) => format!("user.{}", event.origin_cluster),
        Some(Kind::Post(_)) => format!("post.{}", event.origin_cluster),
        Some(Kind::Relation(r)) => format!("rel.{}", cluster_of(r.followee.max(1), clusters)),
        None => "invalid".into(),
    }
}

/// The keys the queue of a synchronizer of `cluster` is bound with.
pub fn bindings(cluster: u32, clusters: u32) -> Vec<String> {
    let mut keys: Vec<String> =
        (1..=clusters).filter(|o| *o != cluster).flat_map(|o| [format!("user.{o}"), format!("post.{o}")]).collect();
    keys.push(format!("rel.{cluster}"));
    keys
}

/// Declares exchanges, every cluster's queue and their bindings.
pub async fn declare(channel: &Channel, names: &Names, clusters: u32, expires: Option<Duration>) -> Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(names.exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await?;
    channel.exchange_declare(names.dead.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    let mut args = FieldTable::default();
    if let Some(expires) = expires {
        // Lets the broker drop the queues of a deployment nobody runs any
        // more (test runs), never those of a live one.
        args.insert("x-expires".into(), AMQPValue::LongLongInt(expires.as_millis() as i64));
    }
    let mut dead_args = args.clone();
    channel.queue_declare(names.dead.as_str().into(), QueueDeclareOptions::durable(), dead_args.clone()).await?;
    channel
        .queue_bind(
            names.dead.as_str().into(),
            names.dead.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    dead_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(names.dead.as_str().into()));
    dead_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    for cluster in 1..=clusters {
        let queue = names.queue(cluster);
        channel.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), dead_args.clone()).await?;
        for key in bindings(cluster, clusters) {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    names.exchange.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sns_proto::internal::{Post, Relation, UserAdded};

    #[test]
    fn names_carry_the_deployment() {
        let n = Names::new("t42");
        assert_eq!(n.exchange, "t42.events");
        assert_eq!(n.queue(2), "t42.cluster.2");
        assert_eq!(n.dead, "t42.dead");
    }

    #[test]
    fn events_route_to_the_clusters_that_need_them() {
        let ev = |kind| SyncEvent { origin_cluster: 1, seq: 1, kind: Some(kind) };
        assert_eq!(routing_key(&ev(Kind::User(UserAdded { user: 1 })), 3), "user.1");
        assert_eq!(
            routing_key(&ev(Kind::Post(Post { user: 1, text: "x".into(), at_ms: 0, client_id: 0 })), 3),
            "post.1"
        );
        let rel = Relation { follower: 1, followee: 5, follow: true, at_ms: 0 };
        assert_eq!(routing_key(&ev(Kind::Relation(rel)), 3), "rel.2");
        // Cluster 2 hears users and posts of 1 and 3, and relations aimed at 2.
        assert_eq!(bindings(2, 3), vec!["user.1", "post.1", "user.3", "post.3", "rel.2"]);
        assert_eq!(bindings(1, 1), vec!["rel.1"]);
    }
}
