//! `sns-operator`: `run` the controller, print the `crd`, or (hidden)
//! `render` an SnsCluster file into the objects the operator would apply.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sns_operator::manager::{self, RunConfig};
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
            }))
        }
    }
}
