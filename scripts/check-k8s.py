"""Offline Kubernetes checks, run by scripts/check-k8s.sh in its venv:
    python check-k8s.py WORK UPDATE
WORK holds crd.yaml (`sns-operator crd`), specs/*.yaml (SnsClusters) and
rendered/*.yaml (`sns-operator render` of each spec); UPDATE is 1 to rewrite
manifests/install.yaml.

Prints one line per property proven (PASS) or broken (FAIL), then
`k8s-check: N properties proven, M failed`. A validator is only trusted once
it has rejected a document broken in one known way (an unknown field, a
wrong type, a missing required field) for the reason expected: a validator
that accepts everything, or rejects for another reason, fails the check."""
import copy
import glob
import json
import os
import re
import sys
import textwrap

import celpy
import helm_python as helm
import jsonschema
import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor

WORK, UPDATE = sys.argv[1], sys.argv[2] == "1"
VERSIONS = ["1.33", "1.37"]
CRD_GROUP = "sns.io"
MONITORING_GROUP = "monitoring.coreos.com"
results = []


def prove(title, problems=()):
    """Records one property: it holds when there are no problems."""
    problems = list(problems)
    print(f"{'PASS' if not problems else 'FAIL'} {title}")
    for p in problems[:10]:
        print(f"       {p}")
    if len(problems) > 10:
        print(f"       ... and {len(problems) - 10} more")
    results.append((not problems, title))


def note(text):
    print(f"     {text}")


def path_of(error):
    return ".".join(str(p) for p in error.path) or "<root>"


def docs_of(text, source, problems):
    out = []
    for d in yaml.safe_load_all(text):
        if d is None:
            continue
        if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= d.keys():
            problems.append(f"{source}: not a Kubernetes object: {str(d)[:80]}")
            continue
        out.append(d)
    return out


def name_of(d):
    return f"{d['kind']}/{d['metadata'].get('name', '?')}"


def k8s_errors(d, version):
    """Problems of d against the Kubernetes `version` schema (strict: unknown
    fields are errors), or [] if it validates."""
    try:
        got = kubernetes_validate.validate(d, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [e]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no Kubernetes {version} schema: {e.message}"]
    # It falls back to the newest schema not newer than asked for.
    return [] if got == version else [f"validated against the {got} schema, not {version}"]


# --- the generated CRD --------------------------------------------------------
load_problems = []
crd_docs = docs_of(open(os.path.join(WORK, "crd.yaml")).read(), "sns-operator crd", load_problems)
if len(crd_docs) != 1:
    sys.exit(f"k8s-check: `sns-operator crd` printed {len(crd_docs)} documents, not 1")
crd = crd_docs[0]
for path in ["manifests/crd.yaml", "charts/sns/crds/snscluster.yaml"]:
    same = docs_of(open(path).read(), path, load_problems) == crd_docs
    prove(f"{path} is `sns-operator crd`'s output", [] if same else ["differs (regenerate it)"])

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
cr_validator = jsonschema.Draft202012Validator(cr_schema)


def cr_errors(d):
    return sorted(cr_validator.iter_errors(d), key=lambda e: list(e.path))


def describe(errors, source=""):
    return [f"{source}{e}" if isinstance(e, str) else f"{source}{e.message} at {path_of(e)}" for e in errors]


# --- SnsCluster documents against the CRD schema (jsonschema) -------------------
example_path = "manifests/examples/snscluster.yaml"
example = docs_of(open(example_path).read(), example_path, load_problems)
prove(f"the example {example_path} validates against the generated CRD schema",
      [p for d in example for p in describe(cr_errors(d), f"{name_of(d)}: ")] or ([] if example else ["no document"]))
specs = {}
for f in sorted(glob.glob(os.path.join(WORK, "specs", "*.yaml"))):
    specs[os.path.basename(f)] = docs_of(open(f).read(), f, load_problems)
prove(f"the render specs validate against the generated CRD schema: {', '.join(specs)}",
      [p for f, ds in specs.items() for d in ds for p in describe(cr_errors(d), f"{f}: ")])


def probe(title, base, mutate, errors_of, keyword, at, field=None):
    """One liveness probe: `base` must be accepted, and `base` changed by
    `mutate` rejected with a `keyword` error at path `at` naming `field`."""
    problems = describe(errors_of(base), "the unchanged document: ")
    broken = copy.deepcopy(base)
    mutate(broken)
    found = errors_of(broken)
    errors = [e for e in found if not isinstance(e, str)]
    if not found:
        problems.append("accepted (the validator is not live)")
    elif not errors:
        problems += describe(found)
    elif not any(e.validator == keyword and path_of(e) == at and (field is None or repr(field) in e.message)
                 for e in errors):
        problems += [f"rejected for another reason: {e.validator}: {e.message[:120]} at {path_of(e)}" for e in errors]
    prove(title, problems)


def set_in(path, value):
    def mutate(d):
        *parents, last = path
        for p in parents:
            d = d.setdefault(p, {}) if isinstance(p, str) else d[p]
        d[last] = value
    return mutate


def delete_in(path):
    def mutate(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        del d[last]
    return mutate


cr_base = example[0] if example else {}
CR = "CRD openAPIV3Schema (jsonschema) rejects"
probe(f"{CR} an unknown field: SnsCluster spec.serverPerCluster", cr_base,
      set_in(["spec", "serverPerCluster"], 2), cr_errors, "additionalProperties", "spec", "serverPerCluster")
probe(f"{CR} an unknown nested field: SnsCluster spec.storage.sise", cr_base,
      set_in(["spec", "storage", "sise"], "1Gi"), cr_errors, "additionalProperties", "spec.storage", "sise")
probe(f"{CR} a wrong type: SnsCluster spec.clusters \"three\"", cr_base,
      set_in(["spec", "clusters"], "three"), cr_errors, "type", "spec.clusters")
probe(f"{CR} a missing required field: SnsCluster without spec", cr_base,
      delete_in(["spec"]), cr_errors, "required", "<root>", "spec")
probe(f"{CR} a missing required field: SnsCluster spec.broker.external.urlSecretRef without name", cr_base,
      set_in(["spec", "broker"], {"external": {"urlSecretRef": {"key": "url"}}}), cr_errors,
      "required", "spec.broker.external.urlSecretRef", "name")
for label, path, value, keyword in [
    ("serversPerCluster 3", ["spec", "serversPerCluster"], 3, "maximum"),
    ("clusters 0", ["spec", "clusters"], 0, "minimum"),
    ("storage.retention Forever", ["spec", "storage", "retention"], "Forever", "enum"),
    ("a name with a dot", ["metadata", "name"], "a.b", "pattern"),
    ("a name of 40 characters", ["metadata", "name"], "a" * 40, "maxLength"),
]:
    probe(f"{CR} an invalid value: SnsCluster {label} ({keyword})", cr_base,
          set_in(path, value), cr_errors, keyword, ".".join(path))

# --- CEL rules (cel-python) on updates, with the API server's defaulting ----------
# Kubernetes' own CEL library (quantity(), isQuantity()) is not in cel-python:
# the rules that use it are left to the API server (tests/kind/run.sh).
K8S_ONLY = re.compile(r"\b(isQuantity|quantity|isURL|url|isIP|ip|isCIDR|cidr|isSemver|semver)\(")
cel_env = celpy.Environment()
cel_programs = {}


def defaulted(schema, value):
    """The API server's structural defaulting: absent properties with a
    default get it, recursively inside present objects."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for k, sub in schema["properties"].items():
        if k not in out and "default" in sub:
            out[k] = copy.deepcopy(sub["default"])
        if k in out:
            out[k] = defaulted(sub, out[k])
    return out


def cel_refusals(schema, new, old, path="", skipped=None):
    """The messages of the CEL rules that refuse updating `old` to `new`
    (objects already defaulted). Transition rules (`oldSelf`) apply where
    both have the field, as on the API server."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        if K8S_ONLY.search(text):
            if skipped is not None:
                skipped.add(f"{path or '<root>'}: {text}")
            continue
        if "oldSelf" in text and old is None:
            continue
        if text not in cel_programs:
            cel_programs[text] = cel_env.program(cel_env.compile(text))
        act = {"self": celpy.json_to_cel(new)}
        if old is not None:
            act["oldSelf"] = celpy.json_to_cel(old)
        got = cel_programs[text].evaluate(act)
        if not (isinstance(got, celpy.celtypes.BoolType) and bool(got)):
            out.append(rule.get("message", text))
    if isinstance(new, dict):
        for k, sub in schema.get("properties", {}).items():
            if k in new and new[k] is not None:
                o = old.get(k) if isinstance(old, dict) else None
                out += cel_refusals(sub, new[k], o, f"{path}.{k}", skipped)
    return out


spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def update_refusals(old_spec, new_spec, skipped=None):
    """Refusals of an update, or of a creation when old_spec is None."""
    old = None if old_spec is None else defaulted(spec_schema, old_spec)
    new = defaulted(spec_schema, new_spec)
    return cel_refusals(spec_schema, new, old, ".spec", skipped)


skipped_rules = set()
update_refusals({}, {}, skipped_rules)
note(f"{len(skipped_rules)} of {len(cel_rules)} CEL rules use Kubernetes-only functions and are evaluated "
     "by the API server alone (tests/kind/run.sh):")
for r in sorted(skipped_rules):
    note(f"  {r}")
# (title, old spec, new spec, a word of the message refusing it, or None)
CEL_CASES = [
    # First a rule that is known to hold: the evaluator must be live.
    ("spec.clusters changed", {"clusters": 3}, {"clusters": 4}, "clusters is immutable"),
    ("an unchanged spec", {"clusters": 3}, {"clusters": 3}, None),
    ("both broker kinds", {}, {"broker": {"managed": {}, "external": {"urlSecretRef": {"name": "x"}}}},
     "not both"),
    ("spec.storage.storageClassName set later", {}, {"storage": {"storageClassName": "fast"}},
     "storage.storageClassName is immutable"),
    ("broker.managed.storageClassName changed", {"broker": {"managed": {"storageClassName": "a"}}},
     {"broker": {"managed": {"storageClassName": "b"}}}, "broker.managed.storageClassName is immutable"),
    ("broker.managed.storageClassName set on an implicit managed broker", {},
     {"broker": {"managed": {"storageClassName": "fast"}}}, "broker.managed.storageClassName is immutable"),
    ("broker.managed.storageClassName dropped", {"broker": {"managed": {"storageClassName": "a"}}},
     {"broker": {}}, "broker.managed.storageClassName is immutable"),
    ("broker.managed.storageSize set on an implicit managed broker", {},
     {"broker": {"managed": {"storageSize": "5Gi"}}}, "broker.managed.storageSize is immutable"),
    ("broker.managed written out with its defaults", {}, {"broker": {"managed": {"storageSize": "1Gi"}}}, None),
    ("broker.managed.image changed", {"broker": {"managed": {"image": "rabbitmq:3.12"}}},
     {"broker": {"managed": {"image": "rabbitmq:3.13"}}}, None),
    ("managed broker replaced by an external one", {"broker": {"managed": {"storageClassName": "a"}}},
     {"broker": {"external": {"urlSecretRef": {"name": "amqp"}}}}, None),
    ("a new SnsCluster with broker.managed.replicas 2", None, {"broker": {"managed": {"replicas": 2}}},
     "broker.managed.replicas must be 1 or an odd number"),
    ("a new SnsCluster with broker.managed.replicas 3", None, {"broker": {"managed": {"replicas": 3}}}, None),
    ("broker.managed.replicas 1 -> 3", {}, {"broker": {"managed": {"replicas": 3}}},
     "broker.managed.replicas is immutable"),
    ("broker.managed.replicas 3 -> 5", {"broker": {"managed": {"replicas": 3}}},
     {"broker": {"managed": {"replicas": 5}}}, "broker.managed.replicas is immutable"),
    ("broker.queueType classic -> quorum on the same broker", {}, {"broker": {"queueType": "quorum"}},
     "broker.queueType is immutable"),
    ("broker.queueType written out as its default (quorum on 3 replicas)", {"broker": {"managed": {"replicas": 3}}},
     {"broker": {"managed": {"replicas": 3}, "queueType": "quorum"}}, None),
    ("broker.queueType changed with a move to an external broker", {},
     {"broker": {"external": {"urlSecretRef": {"name": "amqp"}}, "queueType": "quorum"}}, None),
    ("a new SnsCluster with coordinator.replicas 4", None, {"coordinator": {"replicas": 4}},
     "coordinator.replicas must be 1, 2 or 3"),
    ("a new SnsCluster with coordinator.replicas 1", None, {"coordinator": {"replicas": 1}}, None),
    ("coordinator.replicas 1 -> 3", {"coordinator": {"replicas": 1}}, {"coordinator": {"replicas": 3}}, None),
    ("coordinator.replicas 2 (the default) -> 3", {}, {"coordinator": {"replicas": 3}}, None),
    ("coordinator.replicas 3 -> 2", {"coordinator": {"replicas": 3}}, {"coordinator": {"replicas": 2}}, None),
    ("coordinator.replicas 2 (the default) -> 1", {}, {"coordinator": {"replicas": 1}},
     "coordinator.replicas cannot go back to 1"),
]
for title, old_spec, new_spec, refused in CEL_CASES:
    got = update_refusals(old_spec, new_spec)
    if refused is None:
        prove(f"CEL rules (cel-python) accept the update: {title}", got)
    else:
        prove(f"CEL rules (cel-python) refuse the update: {title}",
              [] if any(refused in m for m in got) else [f"refused by {got}, not for {refused!r}" if got
                                                          else "accepted"])

# --- the Helm chart (helm-python-sdk: the Helm SDK as a library, no binary) ------
chart = helm.Chart.load("charts/sns")
for v in VERSIONS:
    report = helm.lint("charts/sns", strict=True, kube_version=f"v{v}.0")
    bad = (report.get("errors") or []) + [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    infos = "; ".join(m["error"] for m in report.get("messages", []) if m.get("severity", 0) < 2) or "none"
    prove(f"helm lint --strict passes for Kubernetes {v} (Helm SDK {helm.helm_sdk_version()}; info only: {infos})",
          [json.dumps(m) for m in bad])
value_sets = {
    "defaults": {},
    "one namespace, own service account": {
        "watchNamespace": "team-a", "serviceAccount": {"create": False, "name": "ops"},
        "image": {"repository": "registry.example.com/tiny-sns", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}], "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]},
    "three replicas, PodMonitors": {
        "replicaCount": 3,
        "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                      "interval": "15s", "scrapeTimeout": "5s"}}},
    "one namespace, one replica without election, PodMonitors": {
        "replicaCount": 1, "leaderElection": {"enabled": False}, "watchNamespace": "team-a",
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
        "monitoring": {"podMonitor": {"enabled": True}}},
}
schema_problems = []
for label, values in value_sets.items():
    try:
        chart.validate_schema(values)
    except helm.HelmError as e:
        schema_problems.append(f"{label}: {e}")
prove(f"values.schema.json accepts the value sets rendered below: {', '.join(value_sets)}", schema_problems)
for label, values, at in [
    ("an unknown key (replicas)", {"replicas": 2}, "at '':"),
    ("a wrong type (metrics.port \"http\")", {"metrics": {"port": "http"}}, "at '/metrics/port':"),
    ("a missing required value (image.repository)", {"image": {"repository": None}}, "missing property 'repository'"),
    ("a bad pull policy (image.pullPolicy Sometimes)", {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
     "at '/image/pullPolicy':"),
    ("no replica (replicaCount 0)", {"replicaCount": 0}, "at '/replicaCount':"),
    ("a scrape interval Prometheus cannot read (30 seconds)",
     {"monitoring": {"podMonitor": {"interval": "30 seconds"}}}, "at '/monitoring/podMonitor/interval':"),
    ("a lease duration of a fraction of a second (1500ms)",
     {"leaderElection": {"leaseDuration": "1500ms"}}, "at '/leaderElection/leaseDuration':"),
]:
    try:
        chart.validate_schema(values)
        problems = ["accepted"]
    except helm.HelmError as e:
        problems = [] if at in str(e) else [f"rejected for another reason: {e}"]
    prove(f"values.schema.json rejects {label}", problems)
crd_files = [c["name"] for c in chart.crds]
prove("the chart's only CRD is crds/snscluster.yaml",
      [] if crd_files == ["crds/snscluster.yaml"] else [f"CRD files: {crd_files}"])


def render_chart(values, upgrade=False):
    rendered = chart.render(values, name="sns", namespace="sns-system", is_install=not upgrade, is_upgrade=upgrade)
    docs, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        else:
            docs += docs_of(text, path, load_problems)
    return docs, notes


sources = []  # (where from, document): everything to validate against Kubernetes
chart_renders = {}  # value set -> its documents
notes_problems, placeholder_problems, notes_cr_problems, upgrade_problems = [], [], [], []
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>\n]*>")
CRD_STEP = "sns-operator crd | kubectl apply --server-side --force-conflicts -f -"


def notes_snscluster(notes):
    """The SnsCluster NOTES.txt tells to apply (a heredoc), parsed."""
    m = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", notes, re.S)
    return yaml.safe_load(textwrap.dedent(m.group(1))) if m else None


for label, values in value_sets.items():
    for upgrade in (False, True):
        docs, notes = render_chart(values, upgrade)
        if not upgrade:
            sources += [("chart", d) for d in docs]
            chart_renders[label] = docs
        when = f"values '{label}'{' on upgrade' if upgrade else ''}"
        if "kubectl port-forward svc/demo-coordinator 9000:9000" not in notes:
            notes_problems.append(f"{when}: NOTES.txt lacks it")
        placeholder_problems += [f"{when}: {p}" for p in PLACEHOLDER.findall(notes)]
        if "{{" in notes or "}}" in notes:
            placeholder_problems.append(f"{when}: an unrendered template action")
        obj = notes_snscluster(notes)
        notes_cr_problems += [f"{when}: {p}" for p in
                              (describe(cr_errors(obj)) if isinstance(obj, dict) else ["no SnsCluster heredoc"])]
        if (CRD_STEP in notes) != upgrade:
            upgrade_problems.append(f"{when}: the CRD step is {'missing' if upgrade else 'shown on install'}")
prove("the chart's NOTES.txt gives the port-forward recipe", notes_problems)
prove("the chart's NOTES.txt has no placeholder (<...>, <no value>) or template action left", placeholder_problems)
prove("the SnsCluster NOTES.txt tells to apply validates against the generated CRD schema", notes_cr_problems)
prove("the chart's NOTES.txt gives the CRD apply step on upgrade (Helm never upgrades crds/), only then",
      upgrade_problems)

try:
    render_chart({"replicaCount": 2, "leaderElection": {"enabled": False}})
    prove("the chart refuses several replicas without leader election", ["rendered"])
except helm.HelmError as e:
    prove("the chart refuses several replicas without leader election",
          [] if "needs leaderElection.enabled" in str(e) else [f"failed for another reason: {e}"])


def find(docs, kind, suffix=""):
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def env_of(container, name):
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def selects(selector, labels):
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/
    Exists/DoesNotExist) selects a pod with `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        op, k = e["operator"], e["key"]
        if (op == "In" and labels.get(k) not in e["values"]) or (op == "NotIn" and labels.get(k) in e["values"]) \
                or (op == "Exists" and k not in labels) or (op == "DoesNotExist" and k in labels):
            return False
    return True


# The pods the operator renders, for the nodes' PodMonitor.
operator_pods, operator_pod_specs = [], []
for f in sorted(glob.glob(os.path.join(WORK, "rendered", "*.yaml"))):
    for d in docs_of(open(f).read(), f, load_problems):
        if d["kind"] == "StatefulSet":
            where = f"{os.path.basename(f)}: {d['metadata']['name']}"
            operator_pods.append((where, d["spec"]["template"]["metadata"]["labels"]))
            operator_pod_specs.append((where, d["spec"]["template"]["spec"]))

lease_problems, strategy_problems, monitor_problems = [], [], []
for label, docs in chart_renders.items():
    deployment = find(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ns = deployment["metadata"]["namespace"]
    elect = env_of(container, "SNS_OPERATOR_LEADER_ELECT")
    strategy = deployment["spec"]["strategy"]["type"]
    if elect == "true":
        lease = env_of(container, "SNS_OPERATOR_LEASE_NAME")
        lease_ns = next((e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
                         if e["name"] == "SNS_OPERATOR_LEASE_NAMESPACE"), None)
        roles = [r for r in find(docs, "Role", "-leader-election") if r["metadata"]["namespace"] == ns]
        bindings = [b for b in find(docs, "RoleBinding", "-leader-election") if b["metadata"]["namespace"] == ns]
        granted = {(v, n) for r in roles for rule in r["rules"] if "coordination.k8s.io" in rule["apiGroups"]
                   and "leases" in rule["resources"] for v in rule["verbs"] for n in rule.get("resourceNames", ["*"])}
        wanted = {("create", "*"), ("get", lease), ("update", lease)}
        if lease_ns != "metadata.namespace":
            lease_problems.append(f"{label}: the lease namespace is not the pod's own ({lease_ns})")
        if granted != wanted:
            lease_problems.append(f"{label}: the Role grants {sorted(granted)}, the elector needs {sorted(wanted)}")
        if not any(b["roleRef"]["name"] == r["metadata"]["name"] and
                   {"kind": "ServiceAccount", "name": pod["spec"]["serviceAccountName"], "namespace": ns}
                   in b["subjects"] for b in bindings for r in roles):
            lease_problems.append(f"{label}: no RoleBinding gives the Role to the operator's service account")
    elif find(docs, "Role", "-leader-election"):
        lease_problems.append(f"{label}: a leader-election Role without an election")
    if (strategy == "RollingUpdate") != (elect == "true"):
        strategy_problems.append(f"{label}: strategy {strategy} with leader election {elect}")
    if deployment["spec"]["replicas"] > 1 and elect != "true":
        strategy_problems.append(f"{label}: {deployment['spec']['replicas']} replicas without an election")

    monitors = find(docs, "PodMonitor")
    enabled = value_sets[label].get("monitoring", {}).get("podMonitor", {}).get("enabled", False)
    if enabled != bool(monitors):
        monitor_problems.append(f"{label}: podMonitor.enabled {enabled} but {len(monitors)} PodMonitors")
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    for m in find(docs, "PodMonitor", "-operator"):
        if not selects(m["spec"]["selector"], pod["metadata"]["labels"]) or m["metadata"]["namespace"] != ns:
            monitor_problems.append(f"{label}: {name_of(m)} does not select the operator's pods")
        missing = [e["port"] for e in m["spec"]["podMetricsEndpoints"] if e["port"] not in ports]
        if missing:
            monitor_problems.append(f"{label}: {name_of(m)} scrapes ports {missing} the operator lacks ({ports})")
    node_metrics_ports = sorted({p["name"] for _, spec in operator_pod_specs for c in spec["containers"]
                                 for p in c.get("ports", []) if p["name"].endswith("metrics")})
    for m in find(docs, "PodMonitor", "-nodes"):
        for where, labels in operator_pods:
            node = labels.get("app.kubernetes.io/component") in ("coordinator", "server")
            if selects(m["spec"]["selector"], labels) != node:
                monitor_problems.append(f"{label}: {name_of(m)} {'misses' if node else 'selects'} {where}")
        # Every metrics port a rendered node container declares (`metrics`;
        # `sync-metrics` for a server pod's synchronizer), and only those.
        scraped = sorted(e["port"] for e in m["spec"]["podMetricsEndpoints"])
        if scraped != node_metrics_ports:
            monitor_problems.append(f"{label}: {name_of(m)} scrapes {scraped}, the node pods serve metrics on "
                                    f"{node_metrics_ports}")
        watch = value_sets[label].get("watchNamespace")
        expected = {"matchNames": [watch]} if watch else {"any": True}
        if m["spec"]["namespaceSelector"] != expected:
            monitor_problems.append(f"{label}: {name_of(m)} looks in {m['spec']['namespaceSelector']}, not {expected}")
prove("the leader-election Role grants exactly the Lease the Deployment names (create; get, update) "
      "to the operator's service account, in its namespace", lease_problems)
prove("several replicas only with leader election, rolled one at a time (RollingUpdate); "
      "without an election, Recreate", strategy_problems)
prove("the PodMonitors select the operator's pods and their metrics port, and the coordinator and server pods "
      "the operator renders (not the broker's)", monitor_problems)
if not any(p["name"] == "metrics" for _, spec in operator_pod_specs for c in spec["containers"]
           for p in c.get("ports", [])):
    note("no node container has a port named metrics yet (sns-node gets --metrics-port later): "
         "until then the nodes' PodMonitor finds no target")

# --- manifests/install.yaml -----------------------------------------------------
namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
    "name": "sns-system", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
chart_docs, _ = render_chart({})
# Helm's install order, so a plain kubectl apply creates what is referenced first.
ORDER = ["ServiceAccount", "ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding", "Service", "Deployment"]
chart_docs.sort(key=lambda d: ORDER.index(d["kind"]) if d["kind"] in ORDER else len(ORDER))
header = ("# Plain kubectl install of sns-operator (namespace sns-system): the CRD, RBAC and\n"
          "# the operator, i.e. charts/sns rendered with default values.\n"
          "#   kubectl apply --server-side -f manifests/install.yaml\n"
          "# Generated by scripts/check-k8s.sh --update; do not edit.\n")
expected = header + "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in [namespace, crd] + chart_docs)
if UPDATE:
    with open("manifests/install.yaml", "w") as f:
        f.write(expected)
    note("wrote manifests/install.yaml")
current = open("manifests/install.yaml").read() if os.path.exists("manifests/install.yaml") else ""
install_docs = docs_of(current, "manifests/install.yaml", load_problems)
prove("manifests/install.yaml is Namespace + CRD + the chart with default values",
      [] if current == expected else ["differs from the chart's render (run scripts/check-k8s.sh --update)"])

# --- every kind rendered, on every Kubernetes version ---------------------------
sources.append(("sns-operator crd", crd))
for f in sorted(glob.glob(os.path.join(WORK, "rendered", "*.yaml"))):
    sources += [("operator render", d) for d in docs_of(open(f).read(), f, load_problems)]
sources += [("install.yaml", d) for d in install_docs]
prove("every rendered document is a Kubernetes object (apiVersion, kind, metadata)", load_problems)

# First the validator must reject a rendered workload broken in one known way.
workloads = [d for s, d in sources if s == "operator render" and d["kind"] == "StatefulSet"]
workloads += [d for s, d in sources if d["kind"] in ("StatefulSet", "Deployment")]
if not workloads:
    prove("a rendered StatefulSet or Deployment to probe the Kubernetes validator with", ["none rendered"])
else:
    w = workloads[0]
    K = "Kubernetes schema (kubernetes-validate, strict) rejects"
    container = ["spec", "template", "spec", "containers", 0]
    for v in VERSIONS:
        def errs(d, v=v):
            return k8s_errors(d, v)
        probe(f"{K} an unknown field: {w['kind']} spec.template.spec.containers[0].bogusField (Kubernetes {v})",
              w, set_in(container + ["bogusField"], 1), errs, "additionalProperties",
              "spec.template.spec.containers.0", "bogusField")
        probe(f"{K} a wrong type: {w['kind']} spec.replicas \"three\" (Kubernetes {v})", w,
              set_in(["spec", "replicas"], "three"), errs, "type", "spec.replicas")
        probe(f"{K} a missing required field: {w['kind']} without spec.selector (Kubernetes {v})", w,
              delete_in(["spec", "selector"]), errs, "required", "spec", "selector")

# --- Prometheus Operator objects: its v1 API types (pydantic), strictly ---------
class ModelError:
    """A pydantic error, or a field the model dropped, in jsonschema's terms
    (validator, path, message) so `probe` reads it."""

    def __init__(self, validator, path, message):
        self.validator, self.path, self.message = validator, list(path), message

    def __str__(self):
        return self.message


PYDANTIC_KEYWORD = {"missing": "required", "string_pattern_mismatch": "pattern", "literal_error": "enum",
                    "extra_forbidden": "additionalProperties"}


def dropped(given, kept, path=()):
    """Fields of `given` the model did not keep: unknown to the API (the
    API server would reject them under strict field validation), or
    values it coerced (a wrong type)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for k, v in given.items():
            if k not in kept:
                yield ModelError("additionalProperties", path,
                                 f"Additional properties are not allowed ({k!r} was unexpected)")
            else:
                yield from dropped(v, kept[k], path + (k,))
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (g, k) in enumerate(zip(given, kept)):
            yield from dropped(g, k, path + (i,))
    elif given != kept:
        yield ModelError("type", path, f"{given!r} is read as {kept!r}")


def monitoring_errors(d):
    model = {"PodMonitor": PodMonitor}.get(d.get("kind"))
    if model is None:
        return [f"no model for {d.get('apiVersion')} {d.get('kind')}"]
    try:
        kept = model.model_validate(d).model_dump(by_alias=True, exclude_unset=True, mode="json")
    except pydantic.ValidationError as e:
        out = []
        for err in e.errors():
            keyword = PYDANTIC_KEYWORD.get(err["type"], "type" if err["type"].endswith("_type") else err["type"])
            loc = err["loc"]
            if keyword == "required":
                out.append(ModelError(keyword, loc[:-1], f"{loc[-1]!r} is a required property"))
            else:
                out.append(ModelError(keyword, loc, err["msg"]))
        return out
    return list(dropped(d, kept))


monitors = [d for s, d in sources if d["apiVersion"].split("/")[0] == MONITORING_GROUP]
if monitors:
    m = next(d for d in monitors if d["kind"] == "PodMonitor")
    PM = "prometheus-operator v1 API types (cloudcoil models, strict) reject"
    endpoint = ["spec", "podMetricsEndpoints", 0]
    probe(f"{PM} an unknown field: PodMonitor spec.podMetricsEndpoints[0].prot", m,
          set_in(endpoint + ["prot"], "metrics"), monitoring_errors, "additionalProperties",
          "spec.podMetricsEndpoints.0", "prot")
    probe(f"{PM} an unknown metadata field: PodMonitor metadata.label", m,
          set_in(["metadata", "label"], {"a": "b"}), monitoring_errors, "additionalProperties", "metadata", "label")
    probe(f"{PM} a wrong type: PodMonitor spec.podMetricsEndpoints \"metrics\"", m,
          set_in(["spec", "podMetricsEndpoints"], "metrics"), monitoring_errors, "type", "spec.podMetricsEndpoints")
    probe(f"{PM} a missing required field: PodMonitor without spec.selector", m,
          delete_in(["spec", "selector"]), monitoring_errors, "required", "spec", "selector")
    probe(f"{PM} an invalid value: PodMonitor spec.podMetricsEndpoints[0].interval 30x (pattern)", m,
          set_in(endpoint + ["interval"], "30x"), monitoring_errors, "pattern", "spec.podMetricsEndpoints.0.interval")
    distinct = {json.dumps(d, sort_keys=True): d for d in monitors}.values()
    prove(f"PodMonitor validates against prometheus-operator's v1 API types (strict): {len(distinct)} distinct "
          f"object(s), from chart {len(monitors)}",
          [p for d in distinct for p in describe(monitoring_errors(d), f"{name_of(d)}: ")])
else:
    prove("a rendered PodMonitor to validate", ["none rendered"])

# --- NetworkPolicies: the validator is live for them, and they let in exactly
# the pods they are meant to ---------------------------------------------------
rendered_docs = [d for s, d in sources if s == "operator render"]
policies = [d for d in rendered_docs if d["kind"] == "NetworkPolicy"]
if not policies:
    prove("the operator renders NetworkPolicies", ["none rendered"])
else:
    base = policies[0]
    K = "Kubernetes schema (kubernetes-validate, strict) rejects"
    for v in VERSIONS:
        def errs(d, v=v):
            return k8s_errors(d, v)
        probe(f"{K} an unknown field: NetworkPolicy spec.ingress[0].fromm (Kubernetes {v})", base,
              set_in(["spec", "ingress", 0, "fromm"], []), errs, "additionalProperties", "spec.ingress.0", "fromm")
        probe(f"{K} a wrong type: NetworkPolicy spec.podSelector \"all\" (Kubernetes {v})", base,
              set_in(["spec", "podSelector"], "all"), errs, "type", "spec.podSelector")


def selects(sel, labels):
    if not isinstance(sel, dict):
        return False
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for e in sel.get("matchExpressions") or []:
        value, values = labels.get(e["key"]), e.get("values") or []
        ok = {"In": value in values, "NotIn": value not in values,
              "Exists": value is not None, "DoesNotExist": value is None}[e["operator"]]
        if not ok:
            return False
    return True


# Every pod the renders make (all in one namespace, so each SnsCluster's
# policies also meet the other SnsClusters' pods), with the role label the
# operator adds to server pods at run time.
pods = []
for d in rendered_docs:
    if d["kind"] != "StatefulSet":
        continue
    t = d["spec"]["template"]
    labels = dict(t["metadata"]["labels"])
    containers = {c["name"] for c in t["spec"]["containers"]}
    if "server" in containers:
        labels["sns.io/role"] = "master"
    ports = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
    # The named container port each probe asks (None: a probe by a port
    # number no container port of the same container declares).
    probed = set()
    for c in t["spec"]["containers"]:
        by_number = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind) or {}
            for action in ("grpc", "tcpSocket", "httpGet"):
                if action in probe:
                    port = probe[action]["port"]
                    probed.add(port if isinstance(port, str) else by_number.get(port))
    # The named container port each node's SNS_METRICS_PORT names (None:
    # one no container port declares).
    metrics = set()
    for c in t["spec"]["containers"]:
        by_number = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
        port = next((e.get("value") for e in c.get("env", []) if e["name"] == "SNS_METRICS_PORT"), None)
        if port is not None:
            metrics.add(by_number.get(int(port)))
    pods.append({"name": d["metadata"]["name"] + "-0", "labels": labels, "containers": containers, "ports": ports,
                 "probed": probed, "metrics": metrics})


def chosen(sel):
    return {p["name"] for p in pods if selects(sel, p["labels"])}


def peers(rule):
    out = set()
    for peer in rule.get("from") or []:
        if set(peer) != {"podSelector"}:
            return {f"a peer beyond this namespace's pods: {peer}"}
        out |= chosen(peer["podSelector"])
    return out


policy_problems = []
for d in policies:
    inst = d["metadata"]["labels"]["app.kubernetes.io/instance"]
    component = d["metadata"]["labels"]["app.kubernetes.io/component"]
    mine = [p for p in pods if p["labels"].get("app.kubernetes.io/instance") == inst]

    def having(container):
        return {p["name"] for p in mine if container in p["containers"]}
    targets = chosen(d["spec"]["podSelector"])
    rules = d["spec"].get("ingress", [])
    expected = {"server": having("server"), "coordinator": having("coordinator"), "broker": having("rabbitmq")}
    if component not in expected:
        policy_problems.append(f"{name_of(d)}: unexpected component {component}")
        continue
    if not targets or targets != expected[component]:
        policy_problems.append(f"{name_of(d)} selects {sorted(targets)}, not {sorted(expected[component])}")
    for rule in rules:
        for port in rule.get("ports") or []:
            for t in targets:
                if port["port"] not in next(p["ports"] for p in pods if p["name"] == t):
                    policy_problems.append(f"{name_of(d)}: {t} has no port {port['port']}")
    wanted = {
        # Servers and synchronizers: from the deployment's nodes only; their
        # plain-text health ports from anywhere (the kubelet's probes).
        "server": [having("server") | having("coordinator"), None],
        # The coordinator: from anywhere its Service admits; its health
        # port from anywhere (the kubelet's probes).
        "coordinator": [None, None],
        # The broker: AMQP from the synchronizers, anything from its peers.
        "broker": [having("synchronizer"), having("rabbitmq")],
    }[component]
    got = [None if "from" not in r else peers(r) for r in rules]
    if got != wanted:
        policy_problems.append(f"{name_of(d)} lets in {got}, not {wanted}")
    if component == "broker":
        # The synchronizers' way in is the port their AMQP_URL dials (TLS
        # on: amqps alone), by the name the broker's container gives it.
        dialled = set()
        for s in rendered_docs:
            if s["kind"] != "StatefulSet" or s["metadata"]["labels"]["app.kubernetes.io/instance"] != inst:
                continue
            for c in s["spec"]["template"]["spec"]["containers"]:
                url = next((e.get("value") for e in c.get("env", []) if e["name"] == "AMQP_URL"), None)
                if url:
                    dialled.add(int(re.search(r":(\d+)/", url).group(1)))
        broker_sts = next(s for s in rendered_docs if s["kind"] == "StatefulSet"
                          and s["metadata"]["name"] == f"{inst}-rabbitmq")
        by_number = {p["containerPort"]: p["name"] for c in broker_sts["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
        admitted = {p["port"] for p in rules[0].get("ports") or []}
        if not dialled or admitted != {by_number.get(n) for n in dialled}:
            policy_problems.append(f"{name_of(d)} admits the synchronizers on {sorted(admitted)}, "
                                   f"they dial {sorted(dialled)}")
    # What is open to any source: the coordinator's client port, the ports
    # the kubelet probes and the metrics ports, exactly; every probe of every selected pod
    # asks a named port opened so (the kubelet's address is no pod's).
    open_ports = {p["port"] for r in rules if "from" not in r for p in r.get("ports") or []}
    if any("from" not in r and not r.get("ports") for r in rules):
        policy_problems.append(f"{name_of(d)} opens every port to any source")
    for t in targets:
        pod = next(p for p in pods if p["name"] == t)
        expected_open = (set(pod["probed"]) | set(pod["metrics"])
                         | ({"grpc"} if component == "coordinator" else set()))
        if None in pod["probed"]:
            policy_problems.append(f"{name_of(d)}: {t} has a probe on an undeclared port")
        elif None in pod["metrics"]:
            policy_problems.append(f"{name_of(d)}: {t} serves metrics on an undeclared port")
        elif component in ("server", "coordinator") and open_ports != expected_open:
            policy_problems.append(f"{name_of(d)} opens {sorted(open_ports)} to any source, "
                                   f"not {sorted(expected_open)} ({t}'s probes)")
instances = {d["metadata"]["name"] for d in rendered_docs if d["kind"] == "ConfigMap"}
prove(f"{len(policies)} rendered NetworkPolicies select and let in exactly the intended pods among "
      f"{len(pods)} pods of {len(instances)} SnsClusters in one namespace", policy_problems)
# Probes: the kubelet's gRPC probe cannot speak TLS, so every node
# container, TLS on or off, is probed by gRPC on its plain-text health port,
# the one SNS_HEALTH_PORT names and a container port declares.
probe_problems, node_containers, tls_states = [], 0, set()
for d in rendered_docs:
    if d["kind"] != "StatefulSet":
        continue
    for c in d["spec"]["template"]["spec"]["containers"]:
        if c.get("command") != ["sns-node"]:
            continue
        node_containers += 1
        where = f"{name_of(d)} {c['name']}"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        tls_states.add("SNS_TLS_CERT" in env)
        health = env.get("SNS_HEALTH_PORT")
        declared = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
        if health is None or int(health) not in declared:
            probe_problems.append(f"{where}: SNS_HEALTH_PORT {health} is no declared container port")
            continue
        ready_service = "readiness" if c["name"] == "server" or "SNS_KUBE_HA" in env else ""
        for kind, service in (("readinessProbe", ready_service),
                              ("livenessProbe", "")):
            grpc = (c.get(kind) or {}).get("grpc")
            if set(c.get(kind) or {}) & {"tcpSocket", "httpGet", "exec"} or grpc is None:
                probe_problems.append(f"{where}: {kind} is not a gRPC probe")
            elif grpc["port"] != int(health) or grpc.get("service") != service:
                probe_problems.append(f"{where}: {kind} asks {grpc}, not port {health} service {service!r}")
if tls_states != {True, False}:
    probe_problems.append(f"the specs render TLS only {tls_states}: both on and off are wanted")
prove(f"{node_containers} node containers (TLS on and off) are probed by gRPC on their plain-text health port",
      probe_problems)
# A replicated coordinator's API access: its pods (SNS_KUBE_HA in their
# environment) run as a ServiceAccount of their own, the only pods with a
# token, bound to a Role granting exactly their Lease and records ConfigMap
# (create unrestricted: it cannot name an object).
ha_problems, ha_pods = [], 0
for d in rendered_docs:
    if d["kind"] != "StatefulSet":
        continue
    inst = d["metadata"]["labels"]["app.kubernetes.io/instance"]
    pod = d["spec"]["template"]["spec"]
    env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
    if "SNS_KUBE_HA" not in env:
        if pod.get("automountServiceAccountToken") is not False or "serviceAccountName" in pod:
            ha_problems.append(f"{name_of(d)}: an API token or a ServiceAccount without SNS_KUBE_HA")
        continue
    ha_pods += 1
    lease = env["SNS_KUBE_HA"].get("value")
    records = (env.get("SNS_KUBE_RECORDS") or {}).get("value") or f"{lease}-records"
    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        if (env.get(name) or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != path:
            ha_problems.append(f"{name_of(d)}: {name} is not the downward API's {path}")
    account = pod.get("serviceAccountName")
    if pod.get("automountServiceAccountToken") is not True or not account:
        ha_problems.append(f"{name_of(d)}: no token of its own ServiceAccount")
    mine = [o for o in rendered_docs if o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == inst]
    if not any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == account for o in mine):
        ha_problems.append(f"{name_of(d)}: ServiceAccount {account} is not rendered")
    bound = [o["roleRef"]["name"] for o in mine if o["kind"] == "RoleBinding" and o["roleRef"]["kind"] == "Role"
             and any(s["kind"] == "ServiceAccount" and s["name"] == account
                     and s.get("namespace") == o["metadata"]["namespace"] for s in o.get("subjects", []))]
    roles = [o for o in mine if o["kind"] == "Role" and o["metadata"]["name"] in bound]
    if len(roles) != 1:
        ha_problems.append(f"{name_of(d)}: {len(roles)} Roles bound to {account}")
        continue
    got = sorted(json.dumps(r, sort_keys=True) for r in roles[0]["rules"])
    want = sorted(json.dumps(r, sort_keys=True) for r in [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [records], "verbs": ["get", "update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ])
    if got != want:
        ha_problems.append(f"{name_of(d)}: Role/{roles[0]['metadata']['name']} grants {got}, not {want}")
if not ha_pods:
    ha_problems.append("no spec renders a replicated coordinator")
prove(f"{ha_pods} replicated coordinator(s): the Role bound to their own ServiceAccount grants exactly the Lease "
      "and records ConfigMap their environment names; no other pod has an API token", ha_problems)
# The operator grants those, so it must hold them (RBAC forbids granting
# more than one holds), in every namespace it manages.
held_problems = []
for label, docs in chart_renders.items():
    rules = [r for d in docs if d["kind"] in ("ClusterRole", "Role") and not d["metadata"]["name"].endswith(
        "-leader-election") for r in d["rules"]]

    def holds(group, resource, verb):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and not r.get("resourceNames") for r in rules)
    for group, resource, verbs in (("coordination.k8s.io", "leases", ["get", "create", "update"]),
                                   ("", "configmaps", ["get", "create", "update", "patch"]),
                                   ("", "serviceaccounts", ["create", "patch"]),
                                   ("rbac.authorization.k8s.io", "roles", ["create", "patch"]),
                                   ("rbac.authorization.k8s.io", "rolebindings", ["create", "patch"])):
        for verb in verbs:
            if not holds(group, resource, verb):
                held_problems.append(f"values '{label}': no {verb} on {group or 'core'}/{resource}")
prove("the operator's RBAC holds what a coordinator's Role grants, and may apply ServiceAccounts, Roles and "
      "RoleBindings", held_problems)
switched_off = [d for d in rendered_docs if d["kind"] == "NetworkPolicy"
                and d["metadata"]["labels"]["app.kubernetes.io/instance"] == "open"]
prove("spec.networkPolicy.enabled: false renders no NetworkPolicy",
      [name_of(d) for d in switched_off] if any(p["labels"].get("app.kubernetes.io/instance") == "open" for p in pods)
      else ["the spec `open` rendered no pods"])

# cert-manager's schema is not vendored here: check the fields the pods
# and the operator rely on.
certificates = [d for d in rendered_docs if d["apiVersion"] == "cert-manager.io/v1"]
cert_problems = [] if certificates else ["no Certificate rendered for the cert-manager spec"]
for d in certificates:
    spec = d.get("spec", {})
    inst = d["metadata"]["labels"]["app.kubernetes.io/instance"]
    # The nodes' certificate (server and client) and the managed broker's
    # (server only), each writing the Secret of its name that pods mount.
    wanted_usages = {f"{inst}-tls": {"server auth", "client auth"}, f"{inst}-rabbitmq-tls": {"server auth"}}
    name = d["metadata"]["name"]
    if d["kind"] != "Certificate" or name not in wanted_usages or spec.get("secretName") != name:
        cert_problems.append(f"{name_of(d)}: not a Certificate writing {inst}-tls or {inst}-rabbitmq-tls")
        continue
    if not spec.get("issuerRef", {}).get("name") or not spec.get("dnsNames"):
        cert_problems.append(f"{name_of(d)}: no issuerRef.name or dnsNames")
    if wanted_usages[name] != set(spec.get("usages", [])) - {"digital signature", "key encipherment"}:
        cert_problems.append(f"{name_of(d)}: usages {spec.get('usages')}")
    mounted = {v["secret"]["secretName"] for s in rendered_docs if s["kind"] == "StatefulSet"
               and s["metadata"]["labels"]["app.kubernetes.io/instance"] == inst
               for v in s["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    if name not in mounted:
        cert_problems.append(f"{name_of(d)}: no pod of {inst} mounts its Secret")
    extra = set(spec) - {"secretName", "secretTemplate", "dnsNames", "ipAddresses", "usages", "privateKey",
                         "issuerRef", "commonName", "duration", "renewBefore"}
    if extra:
        cert_problems.append(f"{name_of(d)}: fields cert-manager v1 does not have: {sorted(extra)}")
prove(f"{len(certificates)} cert-manager Certificate(s) carry secretName, issuerRef, names and their usages, "
      "their Secrets mounted "
      "(cert-manager's own schema is not checked offline)", cert_problems)

# One validation per distinct object: install.yaml repeats the CRD and the
# chart's default render, and the specs render much the same RBAC.
by_kind = {}  # kind -> {canonical JSON: document}
seen_from = {}  # kind -> {where from: documents, repeats included}
for source, d in sources:
    if d["apiVersion"].split("/")[0] in (CRD_GROUP, MONITORING_GROUP, "cert-manager.io"):
        continue  # custom resources: their own schemas and checks, above
    by_kind.setdefault(d["kind"], {})[json.dumps(d, sort_keys=True)] = d
    counts = seen_from.setdefault(d["kind"], {})
    counts[source] = counts.get(source, 0) + 1
for kind in sorted(by_kind):
    objects = by_kind[kind].values()
    origin = ", ".join(f"{source} {n}" for source, n in sorted(seen_from[kind].items()))
    for v in VERSIONS:
        problems = [p for d in objects for p in describe(k8s_errors(d, v), f"{name_of(d)}: ")]
        prove(f"{kind} validates on Kubernetes {v} (strict): {len(objects)} distinct object(s), from {origin}",
              problems)

print()
failed = [title for ok, title in results if not ok]
print(f"k8s-check: {len(results) - len(failed)} properties proven, {len(failed)} failed "
      f"(Kubernetes {', '.join(VERSIONS)}; {sum(len(o) for o in by_kind.values())} distinct objects "
      f"of {len(by_kind)} kinds)")
for title in failed:
    print(f"  - FAIL {title}")
sys.exit(1 if failed else 0)
