//! What the suites do on the deployment's broker objects directly: publish
//! into its exchange as a forger would, and read what its receivers
//! dead-lettered.

use crate::{DEADLINE, amqp_url};
use anyhow::Result;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::time::{Duration, Instant};

/// A connection to the real broker, with one channel.
pub struct Broker {
    conn: Connection,
    pub channel: Channel,
    deployment: String,
}

impl Broker {
    /// Connects for the deployment named `deployment`.
    pub async fn connect(deployment: &str) -> Result<Broker> {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        Ok(Broker { conn, channel, deployment: deployment.to_string() })
    }

    /// Publishes `body` to the deployment's event exchange under `key`
    /// (e.g. `to.2`) and waits for the broker's confirm.
    pub async fn publish(&self, key: &str, body: &[u8], props: BasicProperties) -> Result<()> {
        let exchange = format!("{}.events", self.deployment);
        self.channel
            .basic_publish(exchange.as_str().into(), key.into(), BasicPublishOptions::default(), body, props)
            .await?
            .await?;
        Ok(())
    }

    /// Takes `count` messages off the deployment's dead-letter queue,
    /// polling until [`DEADLINE`]; fewer if they do not come.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<BasicGetMessage>> {
        let queue = format!("{}.dead", self.deployment);
        let deadline = Instant::now() + DEADLINE;
        let mut dead = Vec::new();
        while dead.len() < count && Instant::now() < deadline {
            match self.channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await? {
                Some(m) => dead.push(m),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(dead)
    }

    pub async fn close(self) -> Result<()> {
        self.conn.close(200, "done".into()).await?;
        Ok(())
    }
}
