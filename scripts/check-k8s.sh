#!/usr/bin/env bash
# Offline Kubernetes checks (no cluster, no helm binary, no Docker). Prints
# one line per property proven (PASS) or broken (FAIL), and a last line
# `k8s-check: N properties proven, M failed`:
#  - each kind that the operator (`sns-operator crd` and `render` for a set
#    of specs), the Helm chart (several value sets) or manifests/install.yaml
#    renders validates against the Kubernetes 1.33 and 1.37 OpenAPI schemas
#    in strict mode (kubernetes-validate), once per kind and version, each
#    distinct object once;
#  - the example SnsCluster and the specs validate against the generated
#    CRD's openAPIV3Schema (jsonschema); its CEL rules (cel-python) accept
#    and refuse a set of updates as the API server would, after its
#    defaulting (rules using Kubernetes-only functions are left to it);
#  - every rendered NetworkPolicy selects, and lets in, exactly the pods it
#    is meant to among the pods its SnsCluster's render makes (and none of
#    another SnsCluster's in the same namespace); cert-manager Certificates
#    (no Kubernetes schema) are checked for the fields the pods rely on;
#  - a replicated coordinator's Role grants exactly the Lease and records
#    ConfigMap its pods' environment names, bound to the ServiceAccount
#    those pods run as, the only pods with an API token;
#  - the chart lints (strict) and its values schema holds, offline through
#    helm-python-sdk (the Helm v4 SDK as a native library: no helm binary);
#  - the chart's PodMonitors validate against prometheus-operator's v1 API
#    types (cloudcoil's generated pydantic models; unknown fields are
#    errors), select the pods they are for, and the leader-election Role
#    grants the Lease the Deployment names; NOTES.txt has no placeholder;
#  - manifests/install.yaml is exactly Namespace + CRD + the chart rendered
#    with default values (run with --update to regenerate it).
# Each validator must first reject documents broken in one known way (an
# unknown field, a wrong type, a missing required field), for that reason,
# so a validator that accepts everything cannot pass (scripts/check-k8s.py).
# The Python tools live in a venv under target/ (cached between runs).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

update=0
[ "${1:-}" = "--update" ] && update=1

# Pinned: the schemas ship inside kubernetes-validate.
KV_VERSION=1.37.0
HELM_SDK_VERSION=0.2.2
# prometheus-operator v0.80's API types; the newer model releases need a
# newer Python than Debian's 3.11. PodMonitor's fields used here are older.
CLOUDCOIL_VERSION=0.6.0
PROMETHEUS_OPERATOR_MODELS_VERSION=0.80.1.0
# Evaluates the CRD's CEL rules on updates (those not using Kubernetes-only
# functions), as the API server would.
CEL_PYTHON_VERSION=0.5.0
venv=target/k8s-check/venv
marker="$venv/.pins-$KV_VERSION-$HELM_SDK_VERSION-$CLOUDCOIL_VERSION-$PROMETHEUS_OPERATOR_MODELS_VERSION-$CEL_PYTHON_VERSION"
if [ ! -f "$marker" ]; then
  echo "k8s-check: installing kubernetes-validate==$KV_VERSION helm-python-sdk==$HELM_SDK_VERSION" \
    "cloudcoil-models-prometheus-operator==$PROMETHEUS_OPERATOR_MODELS_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" "helm-python-sdk==$HELM_SDK_VERSION" "jsonschema>=4.18" "PyYAML>=6" \
    "cloudcoil==$CLOUDCOIL_VERSION" "cloudcoil-models-prometheus-operator==$PROMETHEUS_OPERATOR_MODELS_VERSION" \
    "cel-python==$CEL_PYTHON_VERSION"
  touch "$marker"
fi

# scripts/test.sh passes the binary its workspace build just made: built
# alone, sns-operator resolves some dependency features differently (e.g.
# bitflags, fastrand), so building it here would compile kube, lapin and
# sns-node a second time.
operator=${SNS_OPERATOR_BIN:-}
if [ -z "$operator" ]; then
  cargo build --quiet -p sns-operator --bin sns-operator
  operator=target/debug/sns-operator
fi
work=target/k8s-check/work
rm -rf "$work"
mkdir -p "$work/specs" "$work/rendered"

# Specs covering the renderer's branches, besides the committed example.
cp manifests/examples/snscluster.yaml "$work/specs/example.yaml"
cat > "$work/specs/defaults.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: minimal
spec: {}
EOF
cat > "$work/specs/external-single.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: ext
  namespace: team-a
spec:
  clusters: 2
  serversPerCluster: 1
  image: registry.example.com/tiny-sns:1.2.3
  imagePullPolicy: Always
  logLevel: debug
  storage:
    size: 10Gi
    storageClassName: fast-ssd
    retention: Delete
  broker:
    external:
      urlSecretRef:
        name: amqp-credentials
        key: AMQP_URL
  coordinator:
    serviceType: LoadBalancer
    replicas: 1
  resources:
    requests: {cpu: 100m, memory: 128Mi}
    limits: {memory: 512Mi}
EOF
cat > "$work/specs/big.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: big
spec:
  clusters: 12
  heartbeat: {intervalMillis: 250, missed: 4}
  coordinator: {serviceType: NodePort}
  broker:
    managed:
      image: rabbitmq:3.13-management
      storageSize: 5Gi
      storageClassName: standard
      resources:
        requests: {cpu: 200m, memory: 256Mi}
EOF
# A managed broker cluster: three RabbitMQ nodes, quorum queues, its
# certificate (and the nodes') from cert-manager.
cat > "$work/specs/broker-cluster.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: ha
spec:
  clusters: 2
  tls:
    issuerRef: {name: sns-ca, kind: ClusterIssuer}
  broker:
    managed: {replicas: 3}
EOF
# Security switched off, and TLS from cert-manager with an amqps:// broker.
cat > "$work/specs/open.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: open
spec:
  clusters: 2
  networkPolicy: {enabled: false}
  tls: {enabled: false}
EOF
cat > "$work/specs/cert-manager.yaml" <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: issued
spec:
  tls:
    issuerRef: {name: sns-ca, kind: ClusterIssuer}
  broker:
    external:
      urlSecretRef: {name: amqps-credentials}
      caSecretRef: {name: amqps-ca}
EOF
for spec in "$work"/specs/*.yaml; do
  "$operator" render --spec "$spec" --namespace sns-check --default-image tiny-sns:check \
    > "$work/rendered/$(basename "$spec")"
done
"$operator" crd > "$work/crd.yaml"

"$venv/bin/python" scripts/check-k8s.py "$work" "$update"
