//! The managed broker's configuration: one file the operator writes into
//! the image's `conf.d`, read after the image's own defaults so that what
//! it sets wins.

use super::{AMQPS_PORT, Names};
use crate::crd::ManagedBroker;

/// The key of the file in the broker's ConfigMap.
pub const CONF_KEY: &str = "90-sns.conf";
/// Where the broker reads it: the official image reads every file of
/// `/etc/rabbitmq/conf.d` in name order, its own defaults from `10-…`.
pub const CONF_PATH: &str = "/etc/rabbitmq/conf.d/90-sns.conf";

/// Where the broker finds `tls.crt`, `tls.key` and `ca.crt`.
pub const TLS_DIR: &str = "/etc/rabbitmq/tls";

/// The file's contents.
pub(super) fn rabbitmq_conf(names: &Names, broker: &ManagedBroker, tls: bool) -> String {
    let mut lines = vec!["# Written by sns-operator from the SnsCluster; changes are overwritten.".to_string()];
    if tls {
        // AMQP over TLS only: no plain-text listener is left for a client
        // to fall back to. The management UI (15672, for port-forward) and
        // the Erlang distribution ports are not AMQP and stay as they are.
        // Clients are not asked for a certificate: they authenticate with
        // the broker's password.
        lines.extend([
            "listeners.tcp = none".to_string(),
            format!("listeners.ssl.default = {AMQPS_PORT}"),
            format!("ssl_options.cacertfile = {TLS_DIR}/ca.crt"),
            format!("ssl_options.certfile = {TLS_DIR}/tls.crt"),
            format!("ssl_options.keyfile = {TLS_DIR}/tls.key"),
            "ssl_options.verify = verify_none".to_string(),
            "ssl_options.fail_if_no_peer_cert = false".to_string(),
        ]);
    }
    if broker.replicas > 1 {
        // Every pod lists every node: the first to boot on an empty volume
        // forms the cluster, the others join it, whatever the order
        // (the StatefulSet starts them in parallel).
        lines.push("cluster_formation.peer_discovery_backend = classic_config".into());
        for i in 0..broker.replicas {
            lines.push(format!("cluster_formation.classic_config.nodes.{} = {}", i + 1, names.rabbitmq_node(i)));
        }
        // A node cut off from the majority stops serving rather than
        // accepting messages the majority never sees.
        lines.push("cluster_partition_handling = pause_minority".into());
    }
    lines.join("\n") + "\n"
}
