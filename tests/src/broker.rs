//! What the suites do on the broker directly: publish into a deployment's
//! exchange as a forger would, read what its receivers dead-lettered, and
//! stop and start the local broker itself.

use crate::{DEADLINE, amqp_url};
use anyhow::Result;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long connecting to the broker may take here: lapin's handshake has
/// no bound of its own, and a connection that never completes must fail
/// the test or the bench phase, not hang it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker at `url` within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Connection> {
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, ConnectionProperties::default()))
        .await
        .map_err(|_| anyhow::anyhow!("the broker at {url} did not complete the connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(Into::into)
}

/// A connection to the real broker, with one channel.
pub struct Broker {
    conn: Connection,
    pub channel: Channel,
    deployment: String,
}

impl Broker {
    /// Connects for the deployment named `deployment`.
    pub async fn connect(deployment: &str) -> Result<Broker> {
        let conn = connect(&amqp_url()).await?;
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

/// Runs `rabbitmqctl` against the local broker.
pub fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let out = Command::new("rabbitmqctl").args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Whether the suites may stop the broker: a local RabbitMQ. A remote
/// broker (AMQP_URL) is the one documented reason to leave that out; a
/// local broker without `rabbitmqctl` is a broken setup and fails.
pub fn local() -> bool {
    let url = amqp_url();
    url.contains("@127.0.0.1") || url.contains("@localhost") || url.contains("@[::1]")
}

/// The local broker's app, stopped; started again when dropped, whatever
/// happens, so a failing test never leaves the machine without its broker.
pub struct StoppedBroker(bool);

impl StoppedBroker {
    pub fn stop() -> Result<StoppedBroker> {
        rabbitmqctl(&["stop_app"])?;
        Ok(StoppedBroker(true))
    }

    /// Starts the app again and waits until it serves.
    pub fn start(mut self) -> Result<()> {
        self.0 = false;
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup"])
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if self.0 {
            let _ = rabbitmqctl(&["start_app"]);
        }
    }
}
