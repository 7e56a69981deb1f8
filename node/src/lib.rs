//! Tiny SNS node library: everything `sns-node` runs, testable in-process.
//!
//! - [`coordinator`]: routing table, heartbeats, master/slave roles;
//! - [`server`]: the course's SNS service, files, master -> slave forwarding;
//! - [`sync`]: the synchronizer between clusters, over RabbitMQ;
//! - [`kube`]: leader election on a Kubernetes Lease (the coordinator's
//!   replicas and the operator's);
//! - [`store`]: journal, state machine and the spec's files;
//! - [`topology`] and [`launcher`]: one deployment plan, run as local processes.

pub mod auth;
pub mod cli;
pub mod coordinator;
pub mod error;
pub mod ids;
pub mod kube;
pub mod launcher;
pub mod metrics;
pub mod net;
pub mod relay;
pub mod server;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod topology;

use cli::{Cli, Command};
use coordinator::CoordinatorConfig;
use error::{Error, Result};
use metrics::NodeKind;
use server::ServerConfig;
use sync::SyncConfig;
use tokio_util::sync::CancellationToken;

/// Runs the command `cli` names until it finishes or is told to stop.
pub fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    let log = (cli.log_filter().to_string(), cli.log_format);
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match cli.command {
            Command::Coordinator(a) => {
                a.tls.install()?;
                let cfg = CoordinatorConfig { secret: a.secret.load_for(&a.listen.bind)?, ..a.config() };
                // Two coordinators on one state file would each act on
                // records the other rewrites: the first one keeps it. Taken
                // before any port, so a second one started while the first
                // lingers says so rather than that a port is in use.
                let _dir_lock = cfg.data_dir.as_deref().map(store::lock::lock).transpose()?;
                a.listen.bind_side_ports(NodeKind::Coordinator, &shutdown).await?;
                let listener = net::bind(&a.listen.bind, a.port, a.listen.port_file.as_deref()).await?;
                match a.ha.config().map_err(Error::Config)? {
                    Some(ha) => {
                        let client = ::kube::Client::try_default()
                            .await
                            .map_err(|e| Error::Kube(format!("cannot reach the API server: {e}")))?;
                        coordinator::ha::run(cfg, ha, client, listener, shutdown).await
                    }
                    None => coordinator::run(cfg, listener, shutdown).await,
                }
            }
            Command::Server(a) => {
                a.tls.install()?;
                let cfg =
                    ServerConfig { secret: a.secret.load_for(&a.listen.bind)?, ..a.config().map_err(Error::Config)? };
                // Before any port: a server started while the last one on
                // its directory lingers (killed on a hung disk, it exits
                // only once the disk answers) names that process rather
                // than a port in use.
                let dir_lock = store::lock::lock(&cfg.data_dir)?;
                a.listen.bind_side_ports(NodeKind::Server { cluster: a.cluster, id: a.id }, &shutdown).await?;
                // The port file is written once the store is open, so a
                // launcher that starts servers one after another has them
                // register in that order (the first becomes master).
                let listener = net::bind(&a.listen.bind, a.port, None).await?;
                server::serve(cfg, dir_lock, listener, a.listen.port_file.as_deref(), shutdown).await
            }
            Command::Synchronizer(a) => {
                a.tls.install()?;
                let cfg =
                    SyncConfig { secret: a.secret.load_for(&a.listen.bind)?, ..a.config().map_err(Error::Config)? };
                a.listen
                    .bind_side_ports(NodeKind::Synchronizer { cluster: cfg.cluster, id: cfg.id }, &shutdown)
                    .await?;
                let listener = net::bind(&a.listen.bind, a.port, a.listen.port_file.as_deref()).await?;
                sync::run(cfg, listener, shutdown).await
            }
            Command::Local(a) => launcher::run(a, log, shutdown).await,
            Command::Promote(a) => {
                a.tls.install()?;
                coordinator::promote(&a).await
            }
            Command::Switchover(a) => {
                a.tls.install()?;
                coordinator::switchover(&a).await
            }
            Command::Status(a) => {
                a.tls.install()?;
                status::print(&a).await
            }
        }
    });
    // A blocking read of stdin (the launcher's command reader) cannot be
    // interrupted; do not let it hold the process after the work is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    token.cancel();
}
