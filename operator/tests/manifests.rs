//! The committed manifests against what the code generates: the CRD in
//! `manifests/` and in the chart is exactly `sns-operator crd`'s output, and
//! the example SnsCluster is valid for both the operator and the local
//! launcher.

use sns_operator::SnsCluster;
use sns_operator::render::{self, Names, RenderOptions};
use std::path::PathBuf;

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn committed_crds_are_the_generated_one() {
    let generated = sns_operator::crd::crd_yaml();
    for path in ["manifests/crd.yaml", "charts/sns/crds/snscluster.yaml"] {
        assert!(
            repo_file(path) == generated,
            "{path} is stale: regenerate it with `cargo run -q -p sns-operator -- crd > {path}`"
        );
    }
    // install.yaml carries the CRD too (scripts/check-k8s.sh checks the rest
    // of it against the chart).
    let install = repo_file("manifests/install.yaml");
    let crd = serde_json::to_value(sns_operator::crd::crd()).unwrap();
    let found = serde_yaml::Deserializer::from_str(&install)
        .map(|d| serde_yaml::from_value::<serde_json::Value>(serde::Deserialize::deserialize(d).unwrap()).unwrap())
        .any(|doc| doc == crd);
    assert!(found, "manifests/install.yaml does not hold the current CRD: run scripts/check-k8s.sh --update");
}

#[test]
fn example_runs_under_the_operator_and_the_local_launcher() {
    let text = repo_file("manifests/examples/snscluster.yaml");
    let mut obj: SnsCluster = serde_yaml::from_str(&text).unwrap();
    let local = sns_node::topology::parse_sns_cluster(&text).unwrap();
    assert_eq!(obj.spec.deployment_spec(), local.spec);
    assert_eq!(local.metadata.name.as_deref(), obj.metadata.name.as_deref());
    obj.metadata.namespace = Some("default".into());
    obj.metadata.uid = Some("uid".into());
    let rendered = render::render(&obj, &RenderOptions { default_image: "tiny-sns:test".into() }).unwrap();
    // 6 servers, the coordinator, the managed broker.
    assert_eq!(rendered.names_of("StatefulSet").len(), 8);
    assert!(!render::to_yaml(&rendered, &Names::of(&obj).unwrap()).is_empty());
}
