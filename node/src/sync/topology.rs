//! Broker object names, routing keys and bindings.
//!
//! Everything is prefixed by the deployment name, so several deployments
//! (and parallel test runs) share one broker without seeing each other.
//! - `<dep>.events`: durable topic exchange every master synchronizer
//!   publishes to, with key `to.<destination cluster>` (an event goes to
//!   each cluster that needs it: users to all, a relation to the
//!   followee's, a post to those of its author's followers);
//! - `<dep>.cluster.<c>`: one durable queue per cluster, bound to
//!   `to.<c>`. Only the synchronizer beside the cluster's master consumes
//!   it (the other stands by); `x-single-active-consumer` makes sure that,
//!   during a handover, one of them at a time gets deliveries;
//! - `<dep>.dead`: dead-letter exchange and queue for malformed messages.
//!
//! The queues are classic (one broker node) or quorum (replicated by Raft
//! over a RabbitMQ cluster of three or more nodes, so a broker node's loss
//! loses no confirmed message): [`QueueType`]. A queue's type is fixed
//! when it is first declared; declaring it again with the other type is
//! refused by the broker, and [`declare`] says how to change it.
//!
//! Every synchronizer declares the whole topology (it is idempotent), so no
//! event is dropped as unroutable because its receiver has not started yet.

use crate::error::Result;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use sns_proto::internal::SyncEvent;
use std::time::Duration;

/// The type of the deployment's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Classic queues: fine with a single broker node.
    #[default]
    Classic,
    /// Quorum queues: replicated over a broker cluster (3+ nodes).
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

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

/// The routing key of an event: its destination cluster.
pub fn routing_key(event: &SyncEvent) -> String {
    format!("to.{}", event.dest_cluster)
}

/// The keys the queue of `cluster` is bound with.
pub fn bindings(cluster: u32) -> Vec<String> {
    vec![format!("to.{cluster}")]
}

/// Declares exchanges, every cluster's queue and their bindings.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    clusters: u32,
    expires: Option<Duration>,
    queue_type: QueueType,
) -> Result<()> {
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
    args.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.as_str().into()));
    let mut dead_args = args.clone();
    let declare_queue = |name: String, args: FieldTable| async move {
        channel.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args).await.map_err(|e| {
            if e.to_string().contains("PRECONDITION_FAILED") {
                crate::error::Error::Config(format!(
                    "the broker refused queue {name} as a {} queue: it exists with other arguments (another queue type or expiry); to change a deployment's queue type, stop its synchronizers, let the queues drain, delete them (rabbitmqctl delete_queue {name}) and start again ({e})",
                    queue_type.as_str()
                ))
            } else {
                e.into()
            }
        })
    };
    declare_queue(names.dead.clone(), dead_args.clone()).await?;
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
        declare_queue(queue.clone(), dead_args.clone()).await?;
        for key in bindings(cluster) {
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

    #[test]
    fn names_carry_the_deployment() {
        let n = Names::new("t42");
        assert_eq!(n.exchange, "t42.events");
        assert_eq!(n.queue(2), "t42.cluster.2");
        assert_eq!(n.dead, "t42.dead");
    }

    #[test]
    fn events_route_to_their_destination() {
        let ev = SyncEvent { origin_cluster: 1, seq: 1, dest_cluster: 3, ..Default::default() };
        assert_eq!(routing_key(&ev), "to.3");
        assert_eq!(bindings(2), vec!["to.2"]);
    }
}
