#!/usr/bin/env bash
# Offline Kubernetes checks (no cluster, no helm binary, no Docker):
#  - the CRD, every object the operator renders for a set of specs, every
#    object the Helm chart renders (several value sets) and
#    manifests/install.yaml are validated against the Kubernetes 1.33 and
#    1.37 OpenAPI schemas in strict mode (unknown fields are errors), with
#    kubernetes-validate;
#  - the chart is linted (strict) and its values checked against
#    values.schema.json, offline through helm-python-sdk (the Helm v4 SDK as
#    a native library: no helm binary);
#  - manifests/install.yaml is exactly Namespace + CRD + the chart rendered
#    with default values (run with --update to regenerate it);
#  - the example SnsCluster (and the specs above) validate against the
#    generated CRD's openAPIV3Schema with jsonschema; known-bad documents
#    must fail, so a validator that accepts everything cannot pass.
# The Python tools live in a venv under target/ (cached between runs).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

update=0
[ "${1:-}" = "--update" ] && update=1

# Pinned: the schemas ship inside kubernetes-validate.
KV_VERSION=1.37.0
HELM_SDK_VERSION=0.2.2
venv=target/k8s-check/venv
marker="$venv/.pins-$KV_VERSION-$HELM_SDK_VERSION"
if [ ! -f "$marker" ]; then
  echo "k8s-check: installing kubernetes-validate==$KV_VERSION helm-python-sdk==$HELM_SDK_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KV_VERSION" "helm-python-sdk==$HELM_SDK_VERSION" "jsonschema>=4.18" "PyYAML>=6"
  touch "$marker"
fi

cargo build --quiet -p sns-operator --bin sns-operator
operator=target/debug/sns-operator
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
for spec in "$work"/specs/*.yaml; do
  "$operator" render --spec "$spec" --namespace sns-check --default-image tiny-sns:check \
    > "$work/rendered/$(basename "$spec")"
done
"$operator" crd > "$work/crd.yaml"

"$venv/bin/python" - "$work" "$update" <<'PYEOF'
import copy, glob, json, os, sys
import yaml
import jsonschema
import kubernetes_validate
import helm_python as helm

work, update = sys.argv[1], sys.argv[2] == "1"
VERSIONS = ["1.33.0", "1.37.0"]
failures = []
checked = 0

def fail(what, why):
    failures.append(f"{what}: {why}")
    print(f"  FAIL {what}: {why}")

def docs_of(text, source):
    out = []
    for d in yaml.safe_load_all(text):
        if d is None:
            continue
        if not isinstance(d, dict) or "kind" not in d:
            fail(source, f"not a Kubernetes object: {str(d)[:80]}")
            continue
        out.append(d)
    return out

def name_of(d):
    m = d.get("metadata", {})
    return f"{d['kind']}/{m.get('name', '?')}"

def k8s_validate(d, source):
    """Strict schema validation against every supported version."""
    global checked
    for v in VERSIONS:
        try:
            kubernetes_validate.validate(d, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(f"{source} {name_of(d)} (k8s {v})", f"{e.message} at {path}")
            return False
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(f"{source} {name_of(d)}", f"no Kubernetes {v} schema for it: {e}")
            return False
    checked += 1
    return True

# --- the CRD, and its schema as JSON Schema ---------------------------------
crd_docs = docs_of(open(os.path.join(work, "crd.yaml")).read(), "crd")
assert len(crd_docs) == 1, "sns-operator crd prints one document"
crd = crd_docs[0]
print("CRD (sns-operator crd):")
if k8s_validate(crd, "crd"):
    print(f"  ok   {name_of(crd)} against Kubernetes {', '.join(VERSIONS)} (strict)")
for path in ["manifests/crd.yaml", "charts/sns/crds/snscluster.yaml"]:
    if docs_of(open(path).read(), path) != crd_docs:
        fail(path, "differs from `sns-operator crd` (regenerate it)")
    else:
        print(f"  ok   {path} is the generated CRD")

version = crd["spec"]["versions"][0]
cel_rules = []

def to_json_schema(s, path="", root=False):
    """CRD structural schema -> JSON Schema. nullable becomes a null type,
    int-or-string an anyOf; objects with properties reject unknown fields
    (as kubectl's strict field validation does); CEL rules are collected,
    since they cannot be evaluated without an API server."""
    s = copy.deepcopy(s)
    for rule in s.pop("x-kubernetes-validations", []):
        cel_rules.append((path or "<root>", rule["rule"]))
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    for k in [k for k in s if k.startswith("x-kubernetes-")]:
        s.pop(k)
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: to_json_schema(v, f"{path}.{k}") for k, v in s["properties"].items()}
        if not preserve and not root and path != ".metadata":
            s.setdefault("additionalProperties", False)
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = to_json_schema(s["additionalProperties"], f"{path}.*")
    if "items" in s:
        s["items"] = to_json_schema(s["items"], f"{path}[]")
    return s

cr_schema = to_json_schema(version["schema"]["openAPIV3Schema"], root=True)
cr_schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version['name']}"}
cr_schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
cr_schema["required"] = sorted(set(cr_schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
validator = jsonschema.Draft202012Validator(cr_schema)
print(f"  note {len(cel_rules)} CEL rules are not evaluated offline (the API server does; the Rust tests check they are in the schema):")
for p, r in cel_rules:
    print(f"         {p}: {r}")

def cr_validate(d, source):
    global checked
    errors = sorted(validator.iter_errors(d), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        fail(f"{source} {name_of(d)}", f"{e.message} at {'/'.join(str(p) for p in e.path)}")
        return False
    checked += 1
    return True

# --- SnsCluster documents against the generated schema ----------------------
print("SnsCluster documents against the generated CRD schema:")
for spec in sorted(glob.glob(os.path.join(work, "specs", "*.yaml"))):
    for d in docs_of(open(spec).read(), spec):
        if cr_validate(d, os.path.basename(spec)):
            print(f"  ok   {os.path.basename(spec)} {name_of(d)}")
bad = {
    "serversPerCluster 3": {"spec": {"serversPerCluster": 3}},
    "clusters 0": {"spec": {"clusters": 0}},
    "misspelt field": {"spec": {"serverPerCluster": 2}},
    "retention Forever": {"spec": {"storage": {"retention": "Forever"}}},
    "external broker without a secret name": {"spec": {"broker": {"external": {"urlSecretRef": {"key": "url"}}}}},
    "name with a dot": {"metadata": {"name": "a.b"}, "spec": {}},
    "name of 40 characters": {"metadata": {"name": "a" * 40}, "spec": {}},
}
for label, patch in bad.items():
    d = {"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "metadata": {"name": "bad"}}
    d.update(copy.deepcopy(patch))
    if list(validator.iter_errors(d)):
        print(f"  ok   rejected as it must be: {label}")
        checked += 1
    else:
        fail("schema", f"accepted an invalid SnsCluster ({label})")

# --- every object the operator renders --------------------------------------
print("Objects the operator renders (sns-operator render), against Kubernetes schemas:")
for f in sorted(glob.glob(os.path.join(work, "rendered", "*.yaml"))):
    docs = docs_of(open(f).read(), f)
    kinds = {}
    ok = all([k8s_validate(d, os.path.basename(f)) for d in docs])
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"  {'ok  ' if ok else 'FAIL'} {os.path.basename(f)}: {summary}")
# The validator must catch a broken object, or the above proves nothing.
probe = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "probe"},
         "spec": {"replicas": "one", "selector": {}, "serviceName": "x", "template": {}, "bogus": 1}}
try:
    kubernetes_validate.validate(probe, VERSIONS[0], strict=True)
    fail("kubernetes-validate", "accepted a StatefulSet with a bogus field")
except kubernetes_validate.ValidationError:
    print("  ok   a broken StatefulSet is rejected (the validator is live)")
    checked += 1

# --- the Helm chart ----------------------------------------------------------
print("Helm chart charts/sns (helm-python-sdk, Helm SDK " + helm.helm_sdk_version() + ", no helm binary):")
report = helm.lint("charts/sns", strict=True, kube_version="v1.33.0")
lint_errors = report.get("errors") or []
lint_msgs = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
if lint_errors or lint_msgs:
    fail("helm lint --strict", json.dumps(lint_errors + lint_msgs))
else:
    infos = [m["error"] for m in report.get("messages", [])]
    print(f"  ok   helm lint --strict (info only: {'; '.join(infos) or 'none'})")
chart = helm.Chart.load("charts/sns")
value_sets = {
    "defaults": {},
    "one namespace, own service account": {"watchNamespace": "team-a", "serviceAccount": {"create": False, "name": "ops"},
                                           "image": {"repository": "registry.example.com/tiny-sns", "tag": "1.2.3", "pullPolicy": "Always"},
                                           "imagePullSecrets": [{"name": "regcred"}], "nodeSelector": {"kubernetes.io/os": "linux"},
                                           "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
}
for label, values in value_sets.items():
    chart.validate_schema(values)
    rendered = chart.render(values, name="sns", namespace="sns-system", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            if "kubectl port-forward svc/demo-coordinator 9000:9000" not in text:
                fail("NOTES.txt", "lacks the port-forward recipe")
            continue
        docs += docs_of(text, path)
    ok = all([k8s_validate(d, f"chart[{label}]") for d in docs])
    print(f"  {'ok  ' if ok else 'FAIL'} values '{label}': {', '.join(name_of(d) for d in docs)}")
for label, values in {"unknown key": {"replicas": 2}, "bad pull policy": {"image": {"repository": "x", "pullPolicy": "Sometimes"}}}.items():
    try:
        chart.validate_schema(values)
        fail("values.schema.json", f"accepted invalid values ({label})")
    except helm.HelmError:
        print(f"  ok   values.schema.json rejects {label}")
        checked += 1
crd_files = [c["name"] for c in chart.crds]
if crd_files != ["crds/snscluster.yaml"]:
    fail("chart", f"unexpected CRD files {crd_files}")

# --- manifests/install.yaml ---------------------------------------------------
print("manifests/install.yaml:")
namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sns-system",
             "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
rendered = chart.render({}, name="sns", namespace="sns-system", is_install=True)
chart_docs = []
for path, text in sorted(rendered.items()):
    if not path.endswith("NOTES.txt"):
        chart_docs += docs_of(text, path)
# Helm's install order, so a plain kubectl apply creates what is referenced first.
ORDER = ["ServiceAccount", "ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding", "Service", "Deployment"]
chart_docs.sort(key=lambda d: ORDER.index(d["kind"]) if d["kind"] in ORDER else len(ORDER))
expected_docs = [namespace, crd] + chart_docs
header = ("# Plain kubectl install of sns-operator (namespace sns-system): the CRD, RBAC and\n"
          "# the operator, i.e. charts/sns rendered with default values.\n"
          "#   kubectl apply --server-side -f manifests/install.yaml\n"
          "# Generated by scripts/check-k8s.sh --update; do not edit.\n")
expected = header + "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in expected_docs)
if update:
    open("manifests/install.yaml", "w").write(expected)
    print("  wrote manifests/install.yaml")
current = open("manifests/install.yaml").read() if os.path.exists("manifests/install.yaml") else ""
if current != expected:
    fail("manifests/install.yaml", "differs from the chart's render (run scripts/check-k8s.sh --update)")
else:
    docs = docs_of(current, "install.yaml")
    ok = all([k8s_validate(d, "install.yaml") for d in docs])
    print(f"  {'ok  ' if ok else 'FAIL'} matches the chart and validates: {', '.join(name_of(d) for d in docs)}")

print()
if failures:
    print(f"k8s-check: {len(failures)} problem(s):")
    for f in failures:
        print(f"  - {f}")
    sys.exit(1)
print(f"k8s-check: all {checked} checks passed against Kubernetes {', '.join(VERSIONS)} schemas")
PYEOF
