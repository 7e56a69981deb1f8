//! The Kubernetes operator for `SnsCluster` resources.
//!
//! - [`crd`]: the resource's Rust types; the CRD YAML is generated from them;
//! - [`render`]: the child objects of an SnsCluster, a pure function whose
//!   pod command lines come from the same deployment plan as the local
//!   launcher (`sns_node::topology`);
//! - [`coordinator`]: the coordinator's routing table, behind a trait;
//! - [`secrets`]: the Secrets the operator generates (node secret, broker
//!   credentials, CA and node certificate) and their retention;
//! - [`status`]: role labels, conditions, failover detection (pure);
//! - [`rollout`]: rolling updates, one server at a time (pure);
//! - [`scale`]: which servers a scale-down may remove now (pure);
//! - [`switchover`]: planned switchovers (annotation, rollout, scale-down);
//! - [`controller`]: `reconcile` and `error_policy`;
//! - [`metrics`]: Prometheus counters and the health endpoint;
//! - leader election on a Lease, so only one replica reconciles, is
//!   `sns_node::kube::leader` (the coordinator's replicas use it too);
//! - [`manager`]: `sns-operator run`, wiring the above to a cluster.

pub mod controller;
pub mod coordinator;
pub mod crd;
pub mod error;
pub mod manager;
pub mod metrics;
pub mod render;
pub mod rollout;
pub mod scale;
pub mod secrets;
pub mod status;
pub mod switchover;

#[cfg(test)]
mod fixtures;

pub use crd::{SnsCluster, SnsClusterSpec, SnsClusterStatus};
pub use error::{Error, Result};
