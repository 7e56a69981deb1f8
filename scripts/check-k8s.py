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
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

WORK, UPDATE = sys.argv[1], sys.argv[2] == "1"
VERSIONS = ["1.33", "1.37"]
CRD_GROUP = "sns.io"
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
note(f"{len(cel_rules)} CEL rules are not evaluated offline (the API server does; "
     "the Rust tests check they are in the schema):")
for p, r in cel_rules:
    note(f"  {p}: {r}")

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


def render_chart(values):
    rendered = chart.render(values, name="sns", namespace="sns-system", is_install=True)
    docs, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        else:
            docs += docs_of(text, path, load_problems)
    return docs, notes


sources = []  # (where from, document): everything to validate against Kubernetes
notes_problems = []
for label, values in value_sets.items():
    docs, notes = render_chart(values)
    sources += [("chart", d) for d in docs]
    if "kubectl port-forward svc/demo-coordinator 9000:9000" not in notes:
        notes_problems.append(f"values '{label}': NOTES.txt lacks it")
prove("the chart's NOTES.txt gives the port-forward recipe", notes_problems)

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
    pods.append({"name": d["metadata"]["name"] + "-0", "labels": labels, "containers": containers, "ports": ports})


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
        # Servers and synchronizers: from the deployment's nodes only.
        "server": [having("server") | having("coordinator")],
        # The coordinator: from anywhere its Service admits.
        "coordinator": [None],
        # The broker: AMQP from the synchronizers, anything from its peers.
        "broker": [having("synchronizer"), having("rabbitmq")],
    }[component]
    got = [None if "from" not in r else peers(r) for r in rules]
    if got != wanted:
        policy_problems.append(f"{name_of(d)} lets in {got}, not {wanted}")
instances = {d["metadata"]["name"] for d in rendered_docs if d["kind"] == "ConfigMap"}
prove(f"{len(policies)} rendered NetworkPolicies select and let in exactly the intended pods among "
      f"{len(pods)} pods of {len(instances)} SnsClusters in one namespace", policy_problems)
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
    if d["kind"] != "Certificate" or spec.get("secretName") != f"{inst}-tls":
        cert_problems.append(f"{name_of(d)}: not a Certificate writing {inst}-tls")
    if not spec.get("issuerRef", {}).get("name") or not spec.get("dnsNames"):
        cert_problems.append(f"{name_of(d)}: no issuerRef.name or dnsNames")
    if not {"server auth", "client auth"} <= set(spec.get("usages", [])):
        cert_problems.append(f"{name_of(d)}: usages {spec.get('usages')}")
    extra = set(spec) - {"secretName", "secretTemplate", "dnsNames", "ipAddresses", "usages", "privateKey",
                         "issuerRef", "commonName", "duration", "renewBefore"}
    if extra:
        cert_problems.append(f"{name_of(d)}: fields cert-manager v1 does not have: {sorted(extra)}")
prove(f"{len(certificates)} cert-manager Certificate(s) carry secretName, issuerRef, names and both usages "
      "(cert-manager's own schema is not checked offline)", cert_problems)

# One validation per distinct object: install.yaml repeats the CRD and the
# chart's default render, and the specs render much the same RBAC.
by_kind = {}  # kind -> {canonical JSON: document}
seen_from = {}  # kind -> {where from: documents, repeats included}
for source, d in sources:
    if d["apiVersion"].split("/")[0] in (CRD_GROUP, "cert-manager.io"):
        continue  # custom resources: the CRD schema and Certificate checks above
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
