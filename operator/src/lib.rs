//! The Kubernetes operator for `SnsCluster` resources.
//!
//! Not built yet: the CRD types, the reconciler and the `sns-operator`
//! binary come with their own issue. The crate exists so the workspace
//! layout is final from the start.
