//! The deployment plan: a pure function from a deployment spec to the list
//! of processes (role, ids, ports, command line). The local launcher runs
//! the plan as processes; the Kubernetes operator renders the same command
//! lines into pods, so what works locally is what the pods run.

use crate::ids::sync_id;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The part of an `SnsCluster` spec that shapes the topology. Unknown
/// fields (image, storage, ...) belong to the operator and are ignored here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    #[serde(default = "default_clusters")]
    pub clusters: u32,
    #[serde(default = "default_servers")]
    pub servers_per_cluster: u32,
    #[serde(default)]
    pub heartbeat: HeartbeatSpec,
    /// How long a server's journal write may neither end nor fail before
    /// its disk counts as hung (`--disk-stall-limit`; None: the server's
    /// default, two heartbeat intervals within 5 to 30 s).
    #[serde(default)]
    pub disk_stall_limit_millis: Option<u64>,
    /// How long a server's writer waits for more writes under concurrent
    /// load before a group commit (`--commit-delay`; None: the server's
    /// default, 1 ms; 0 turns it off).
    #[serde(default)]
    pub commit_delay_millis: Option<u64>,
    /// How long another cluster may stay short of the events the broker
    /// confirmed for it before the master has them published again
    /// (`--resend-after`; None: the server's default, 3 s).
    #[serde(default)]
    pub resend_after_millis: Option<u64>,
    /// Journal size in bytes at which a server rewrites its journal as one
    /// snapshot of its state (`--compact-at`; None: the server's default,
    /// 64 MiB).
    #[serde(default)]
    pub compact_at_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSpec {
    #[serde(default = "default_interval_ms")]
    pub interval_millis: u64,
    #[serde(default = "default_missed")]
    pub missed: u32,
}

fn default_clusters() -> u32 {
    3
}
fn default_servers() -> u32 {
    2
}
fn default_interval_ms() -> u64 {
    5000
}
fn default_missed() -> u32 {
    2
}

impl Default for HeartbeatSpec {
    fn default() -> Self {
        HeartbeatSpec { interval_millis: default_interval_ms(), missed: default_missed() }
    }
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            clusters: default_clusters(),
            servers_per_cluster: default_servers(),
            heartbeat: HeartbeatSpec::default(),
            disk_stall_limit_millis: None,
            commit_delay_millis: None,
            resend_after_millis: None,
            compact_at_bytes: None,
        }
    }
}

impl DeploymentSpec {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100).contains(&self.clusters) {
            return Err(format!("clusters must be 1..=100, not {}", self.clusters));
        }
        if !(1..=2).contains(&self.servers_per_cluster) {
            return Err(format!("serversPerCluster must be 1 or 2, not {}", self.servers_per_cluster));
        }
        if !(10..=600_000).contains(&self.heartbeat.interval_millis) || !(1..=100).contains(&self.heartbeat.missed) {
            return Err("heartbeat.intervalMillis must be 10..=600000 and heartbeat.missed 1..=100".into());
        }
        if let Some(ms) = self.disk_stall_limit_millis
            && !(1_000..=3_600_000).contains(&ms)
        {
            return Err(format!("diskStallLimitMillis must be 1000..=3600000, not {ms}"));
        }
        if let Some(ms) = self.commit_delay_millis
            && ms > 100
        {
            return Err(format!("commitDelayMillis must be 0..=100, not {ms}"));
        }
        if let Some(ms) = self.resend_after_millis
            && !(1_000..=3_600_000).contains(&ms)
        {
            return Err(format!("resendAfterMillis must be 1000..=3600000, not {ms}"));
        }
        if let Some(bytes) = self.compact_at_bytes
            && bytes < crate::store::log::COMPACT_AT_MIN
        {
            return Err(format!("compactAtBytes must be at least {}, not {bytes}", crate::store::log::COMPACT_AT_MIN));
        }
        Ok(())
    }
}

/// An `SnsCluster` document as the launcher reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct SnsClusterDoc {
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: DeploymentSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: Option<String>,
}

/// Parses an `SnsCluster` YAML document.
pub fn parse_sns_cluster(yaml: &str) -> Result<SnsClusterDoc, String> {
    let doc: SnsClusterDoc = serde_yaml::from_str(yaml).map_err(|e| format!("not an SnsCluster document: {e}"))?;
    if doc.kind != "SnsCluster" {
        return Err(format!("expected kind SnsCluster, found {:?}", doc.kind));
    }
    doc.spec.validate()?;
    Ok(doc)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Server { cluster: u32, id: u32 },
    Synchronizer { cluster: u32, server: u32, id: u32 },
}

/// One process of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Stable name: `coordinator`, `server-<c>-<s>`, `sync-<c>-<s>`.
    pub name: String,
    pub role: Role,
    /// Port to listen on (0 = any free port).
    pub port: u16,
    /// `sns-node` arguments, without the coordinator port (`-k`), which is
    /// only known once the coordinator listens when ports are dynamic.
    pub args: Vec<String>,
}

/// Where and how the processes of a plan run.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// First port; 0 = every process picks a free port.
    pub base_port: u16,
    pub data_root: PathBuf,
    pub coord_host: String,
    /// Address other nodes use to reach a process. `{pod}` is replaced by
    /// the name of the server process whose pod (or host) the process runs
    /// in: the server's own name, or for a synchronizer its server's (the
    /// two share a pod in Kubernetes); `coordinator` for the coordinator.
    pub advertise_host: String,
    pub bind: String,
    /// Broker URL; None leaves it to the `AMQP_URL` environment variable
    /// (how Kubernetes passes it, from a Secret, off the command line).
    pub amqp_url: Option<String>,
    pub deployment: String,
    pub queue_expires: Option<String>,
}

/// Port layout for a fixed base B: coordinator B, server (c, s) B + 10c + s,
/// its synchronizer B + 10c + 5 + s (so 9000, 9011, 9012, 9016, 9017, ...).
pub fn port(base: u16, role: Role) -> u16 {
    if base == 0 {
        return 0;
    }
    let offset = match role {
        Role::Coordinator => 0,
        Role::Server { cluster, id } => 10 * cluster + id,
        Role::Synchronizer { cluster, server, .. } => 10 * cluster + 5 + server,
    };
    base.saturating_add(offset as u16)
}

/// The coordinator's records (its state file) under the data root.
pub fn coordinator_dir(root: &Path) -> PathBuf {
    root.join("coordinator")
}

pub fn data_dir(root: &Path, cluster: u32, server: u32) -> PathBuf {
    root.join(format!("cluster_{cluster}")).join(server.to_string())
}

/// The processes of a deployment, coordinator first.
pub fn plan(spec: &DeploymentSpec, opts: &PlanOptions) -> Vec<Process> {
    let hb = [
        "--heartbeat-interval".to_string(),
        format!("{}ms", spec.heartbeat.interval_millis),
        "--missed-heartbeats".to_string(),
        spec.heartbeat.missed.to_string(),
    ];
    let common = |args: &mut Vec<String>| {
        args.extend(["--clusters".to_string(), spec.clusters.to_string(), "--bind".into(), opts.bind.clone()]);
        args.extend(hb.iter().cloned());
    };
    let mut out = Vec::new();
    let role = Role::Coordinator;
    let mut args = vec![
        "coordinator".to_string(),
        "-p".into(),
        port(opts.base_port, role).to_string(),
        "--data-dir".into(),
        coordinator_dir(&opts.data_root).display().to_string(),
    ];
    common(&mut args);
    out.push(Process { name: "coordinator".into(), role, port: port(opts.base_port, role), args });
    for cluster in 1..=spec.clusters {
        for id in 1..=spec.servers_per_cluster {
            let role = Role::Server { cluster, id };
            let p = port(opts.base_port, role);
            let pod = format!("server-{cluster}-{id}");
            let mut args = vec![
                "server".to_string(),
                "-c".into(),
                cluster.to_string(),
                "-s".into(),
                id.to_string(),
                "-h".into(),
                opts.coord_host.clone(),
                "-p".into(),
                p.to_string(),
                "--data-dir".into(),
                data_dir(&opts.data_root, cluster, id).display().to_string(),
                "--advertise-host".into(),
                opts.advertise_host.replace("{pod}", &pod),
            ];
            if let Some(ms) = spec.disk_stall_limit_millis {
                args.extend(["--disk-stall-limit".to_string(), format!("{ms}ms")]);
            }
            if let Some(ms) = spec.commit_delay_millis {
                args.extend(["--commit-delay".to_string(), format!("{ms}ms")]);
            }
            if let Some(ms) = spec.resend_after_millis {
                args.extend(["--resend-after".to_string(), format!("{ms}ms")]);
            }
            if let Some(bytes) = spec.compact_at_bytes {
                args.extend(["--compact-at".to_string(), bytes.to_string()]);
            }
            common(&mut args);
            out.push(Process { name: pod, role, port: p, args });
        }
    }
    for cluster in 1..=spec.clusters {
        for server in 1..=spec.servers_per_cluster {
            let id = sync_id(cluster, server, spec.clusters);
            let role = Role::Synchronizer { cluster, server, id };
            let p = port(opts.base_port, role);
            let mut args = vec![
                "synchronizer".to_string(),
                "-i".into(),
                id.to_string(),
                "--server-id".into(),
                server.to_string(),
                "-h".into(),
                opts.coord_host.clone(),
                "-p".into(),
                p.to_string(),
                "--servers-per-cluster".into(),
                spec.servers_per_cluster.to_string(),
                "--deployment".into(),
                opts.deployment.clone(),
                "--advertise-host".into(),
                opts.advertise_host.replace("{pod}", &format!("server-{cluster}-{server}")),
            ];
            if let Some(url) = &opts.amqp_url {
                args.extend(["--amqp-url".to_string(), url.clone()]);
            }
            if let Some(expires) = &opts.queue_expires {
                args.extend(["--queue-expires".to_string(), expires.clone()]);
            }
            common(&mut args);
            out.push(Process { name: format!("sync-{cluster}-{server}"), role, port: p, args });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn opts(base: u16) -> PlanOptions {
        PlanOptions {
            base_port: base,
            data_root: PathBuf::from("/data"),
            coord_host: "127.0.0.1".into(),
            advertise_host: "127.0.0.1".into(),
            bind: "127.0.0.1".into(),
            amqp_url: Some("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            deployment: "demo".into(),
            queue_expires: None,
        }
    }

    #[test]
    fn default_plan_has_the_course_topology() {
        let procs = plan(&DeploymentSpec::default(), &opts(9000));
        let names: Vec<&str> = procs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.len(), 13);
        assert_eq!(names[0], "coordinator");
        assert!(names.contains(&"server-2-1") && names.contains(&"sync-3-2"));
        let ports: Vec<u16> = procs.iter().map(|p| p.port).collect();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "ports must not collide");
        let s = procs.iter().find(|p| p.name == "server-2-1").unwrap();
        assert_eq!(s.port, 9021);
        let y = procs.iter().find(|p| p.name == "sync-2-2").unwrap();
        assert_eq!(y.role, Role::Synchronizer { cluster: 2, server: 2, id: 5 });
        assert_eq!(y.port, 9027);
        assert!(plan(&DeploymentSpec::default(), &opts(0)).iter().all(|p| p.port == 0));
    }

    #[test]
    fn advertise_hosts_name_the_pod_and_urls_may_come_from_env() {
        let o = PlanOptions { advertise_host: "{pod}.nodes.ns.svc".into(), amqp_url: None, ..opts(9000) };
        let procs = plan(&DeploymentSpec::default(), &o);
        let arg = |name: &str, flag: &str| {
            let p = procs.iter().find(|p| p.name == name).unwrap();
            p.args.iter().position(|a| a == flag).map(|i| p.args[i + 1].clone())
        };
        assert_eq!(arg("server-2-1", "--advertise-host").as_deref(), Some("server-2-1.nodes.ns.svc"));
        assert_eq!(arg("sync-2-1", "--advertise-host").as_deref(), Some("server-2-1.nodes.ns.svc"));
        assert_eq!(arg("sync-2-1", "--amqp-url"), None);
    }

    #[test]
    fn every_planned_command_line_parses() {
        let spec = DeploymentSpec {
            disk_stall_limit_millis: Some(2_500),
            commit_delay_millis: Some(3),
            resend_after_millis: Some(4_000),
            compact_at_bytes: Some(8_192),
            ..DeploymentSpec::default()
        };
        for p in plan(&spec, &opts(9000)) {
            let mut argv = vec!["sns-node".to_string()];
            argv.extend(p.args.clone());
            argv.extend(["-k".to_string(), "9000".into()]);
            if p.role == Role::Coordinator {
                argv.truncate(argv.len() - 2);
            }
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            match (cli.command, p.role) {
                (Command::Server(s), Role::Server { cluster, id }) => {
                    let cfg = s.config().unwrap();
                    assert_eq!((cfg.cluster, cfg.id), (cluster, id));
                    assert_eq!(cfg.data_dir, data_dir(Path::new("/data"), cluster, id));
                    assert_eq!(cfg.disk_stall_limit, Some(std::time::Duration::from_millis(2_500)));
                    assert_eq!(cfg.commit_delay, std::time::Duration::from_millis(3));
                    assert_eq!(cfg.resend_after, std::time::Duration::from_secs(4));
                    assert_eq!(cfg.compact_at, 8_192);
                }
                (Command::Synchronizer(s), Role::Synchronizer { cluster, server, id }) => {
                    let cfg = s.config().unwrap();
                    assert_eq!((cfg.cluster, cfg.paired_server, cfg.id), (cluster, server, id));
                    assert_eq!(cfg.deployment, "demo");
                }
                (Command::Coordinator(c), Role::Coordinator) => assert_eq!(c.size.clusters, 3),
                (_, role) => panic!("{} parsed as the wrong subcommand for {role:?}", p.name),
            }
        }
    }

    #[test]
    fn sns_cluster_yaml_is_read() {
        let doc = parse_sns_cluster(
            "apiVersion: sns.io/v1alpha1\nkind: SnsCluster\nmetadata:\n  name: demo\nspec:\n  clusters: 2\n  serversPerCluster: 1\n  heartbeat:\n    intervalMillis: 500\n  image: ignored:latest\n",
        )
        .unwrap();
        assert_eq!(doc.metadata.name.as_deref(), Some("demo"));
        assert_eq!(doc.spec.clusters, 2);
        assert_eq!(doc.spec.servers_per_cluster, 1);
        assert_eq!(doc.spec.heartbeat, HeartbeatSpec { interval_millis: 500, missed: 2 });
        assert_eq!(plan(&doc.spec, &opts(0)).len(), 5);
        assert!(parse_sns_cluster("kind: Pod\n").is_err());
        assert!(parse_sns_cluster("kind: SnsCluster\nspec:\n  serversPerCluster: 3\n").is_err());
        let limited = parse_sns_cluster("kind: SnsCluster\nspec:\n  diskStallLimitMillis: 2000\n").unwrap();
        assert_eq!(limited.spec.disk_stall_limit_millis, Some(2_000));
        let err = parse_sns_cluster("kind: SnsCluster\nspec:\n  diskStallLimitMillis: 500\n").unwrap_err();
        assert!(err.contains("diskStallLimitMillis must be 1000..=3600000"), "{err}");
        let tuned =
            parse_sns_cluster("kind: SnsCluster\nspec:\n  commitDelayMillis: 0\n  resendAfterMillis: 30000\n").unwrap();
        assert_eq!((tuned.spec.commit_delay_millis, tuned.spec.resend_after_millis), (Some(0), Some(30_000)));
        let err = parse_sns_cluster("kind: SnsCluster\nspec:\n  commitDelayMillis: 101\n").unwrap_err();
        assert!(err.contains("commitDelayMillis must be 0..=100"), "{err}");
        let err = parse_sns_cluster("kind: SnsCluster\nspec:\n  resendAfterMillis: 999\n").unwrap_err();
        assert!(err.contains("resendAfterMillis must be 1000..=3600000"), "{err}");
        let compacting = parse_sns_cluster("kind: SnsCluster\nspec:\n  compactAtBytes: 1048576\n").unwrap();
        assert_eq!(compacting.spec.compact_at_bytes, Some(1 << 20));
        let err = parse_sns_cluster("kind: SnsCluster\nspec:\n  compactAtBytes: 4095\n").unwrap_err();
        assert!(err.contains("compactAtBytes must be at least 4096"), "{err}");
        assert!(parse_sns_cluster("kind: [").is_err());
    }
}
