//! Running under Kubernetes: leader election on a Lease ([`leader`]), and
//! where a pod learns its namespace and name.

pub mod leader;

/// Where a pod's service account token and namespace are mounted.
const SA_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// This pod's namespace: `POD_NAMESPACE` (the downward API), else the
/// service account's namespace file.
pub fn namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string(SA_NAMESPACE).ok().map(|n| n.trim().to_string()))
        .filter(|n| !n.is_empty())
}

/// This pod's name (`POD_NAME`, else `HOSTNAME`): unique among replicas.
pub fn identity() -> Option<String> {
    ["POD_NAME", "HOSTNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|n| !n.is_empty()))
}
