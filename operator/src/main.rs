//! `sns-operator`: `run` the controller, print the `crd`, or (hidden)
//! `render` an SnsCluster file into the objects the operator would apply.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sns_operator::manager::{self, LeaderElection, RunConfig};
use sns_operator::render::{self, Names, RenderOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "sns-operator", version, about = "Kubernetes operator for Tiny SNS (SnsCluster)")]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "SNS_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (in-cluster service account, or the kubeconfig).
    Run(RunArgs),
    /// Print the SnsCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator would apply for an SnsCluster file.
    #[command(hide = true)]
    Render(RenderArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SNS_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// sns-node image for SnsClusters that do not name one.
    #[arg(long, env = "SNS_OPERATOR_IMAGE", default_value = DEFAULT_IMAGE)]
    default_image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SNS_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// /healthz fails after this long without a reconcile while SnsClusters exist.
    #[arg(long, env = "SNS_OPERATOR_STALL_TIMEOUT", default_value = "120s", value_parser = sns_node::cli::parse_duration)]
    stall_timeout: Duration,
    /// Bound on one routing-table call to a coordinator.
    #[arg(long, env = "SNS_OPERATOR_COORDINATOR_TIMEOUT", default_value = "2s", value_parser = sns_node::cli::parse_duration)]
    coordinator_timeout: Duration,
    /// Re-apply every child at least this often, repairing drift.
    #[arg(long, env = "SNS_OPERATOR_RESYNC", default_value = "60s", value_parser = sns_node::cli::parse_duration)]
    resync: Duration,
    /// Elect a leader among the operator's replicas with a Lease; only the
    /// leader reconciles. Off: this process always reconciles (run one).
    #[arg(long, env = "SNS_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the coordination.k8s.io Lease.
    #[arg(long, env = "SNS_OPERATOR_LEASE_NAME", default_value = "sns-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the service account's, or the kubeconfig context's).
    #[arg(long, env = "SNS_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// A standby takes over a lease it has seen unchanged this long (whole seconds).
    #[arg(long, env = "SNS_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = sns_node::cli::parse_duration)]
    lease_duration: Duration,
    /// The leader stops reconciling when it could not renew for this long (< lease duration).
    #[arg(long, env = "SNS_OPERATOR_RENEW_DEADLINE", default_value = "10s", value_parser = sns_node::cli::parse_duration)]
    renew_deadline: Duration,
    /// How often the leader renews and a standby tries (< renew deadline).
    #[arg(long, env = "SNS_OPERATOR_RETRY_PERIOD", default_value = "2s", value_parser = sns_node::cli::parse_duration)]
    retry_period: Duration,
}

#[derive(Debug, clap::Args)]
struct RenderArgs {
    /// SnsCluster YAML file.
    #[arg(long)]
    spec: PathBuf,
    /// Namespace to render into when the file names none.
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = DEFAULT_IMAGE)]
    default_image: String,
}

const DEFAULT_IMAGE: &str = "tiny-sns:latest";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            std::io::stdout().write_all(sns_operator::crd::crd_yaml().as_bytes())?;
            Ok(())
        }
        Command::Render(a) => {
            let text = std::fs::read_to_string(&a.spec).with_context(|| format!("cannot read {}", a.spec.display()))?;
            let mut obj: sns_operator::SnsCluster =
                serde_yaml::from_str(&text).with_context(|| format!("{} is not an SnsCluster", a.spec.display()))?;
            if obj.metadata.namespace.is_none() {
                obj.metadata.namespace = Some(a.namespace);
            }
            // Owner references need a uid; the API server assigns the real one.
            obj.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
            let rendered = render::render(&obj, &RenderOptions { default_image: a.default_image })?;
            let yaml = render::to_yaml(&rendered, &Names::of(&obj)?);
            std::io::stdout().write_all(yaml.as_bytes())?;
            Ok(())
        }
        Command::Run(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(manager::run(RunConfig {
                metrics_addr: a.metrics_addr,
                default_image: a.default_image,
                namespace: a.namespace,
                stall_timeout: a.stall_timeout,
                coordinator_timeout: a.coordinator_timeout,
                resync: a.resync,
                leader_election: a.leader_elect.then_some(LeaderElection {
                    lease_name: a.lease_name,
                    lease_namespace: a.lease_namespace,
                    lease_duration: a.lease_duration,
                    renew_deadline: a.renew_deadline,
                    retry_period: a.retry_period,
                }),
            }))
        }
    }
}
