#!/usr/bin/env bash
# End-to-end suite on a real Kubernetes (kind): builds the image, installs
# the chart, applies SnsClusters, drives real `tsc` clients through
# `kubectl port-forward` (the coordinator's gateway), and kills master pods
# while a user posts.
#
# What it asserts:
#  1. SPEC scenario 1 on a one-cluster SnsCluster `one` (users 1 and 4);
#  2. SPEC scenario 2 on the example SnsCluster `demo` (3 clusters, users
#     1, 2, 3: lists converge, posts cross clusters through RabbitMQ);
#  3. SPEC scenario 3: the master pod of cluster 2 is deleted, user 5 joins
#     cluster 2, follows and posts converge, user 5 sees no older post;
#  4. failover drills, twice (grace 0 --force, then a 1 s grace), each while
#     user 2 posts: the SnsCluster status names a new live master within
#     FAILOVER_BUDGET seconds, a Failover event is recorded, the master
#     Service follows the role label, every post reaches its follower
#     (nothing acknowledged is lost), and the old pod comes back as slave;
#  5. under continuous writes (acknowledged writes by a user of each
#     cluster, posts by user 2 that users 1 and 5 must all see once), each
#     printing the longest time without an acknowledged write:
#     a. an image change (the chart's tag, hence SNS_OPERATOR_IMAGE) rolls
#        every server, status.rollout reaches Done with 6/6 updated;
#     b. the sns.io/switchover annotation moves cluster 2's master once and
#        is recorded in status.lastSwitchover;
#     c. serversPerCluster 2 -> 1 -> 2, Ready at 3/3 then 6/6;
#     d. the broker pod killed, the posts made meanwhile delivered once;
#     e. the leading coordinator replica is killed (grace 0): the standby
#        takes the Lease over and becomes ready (the takeover time is
#        printed), the SnsCluster is Ready again, every post arrives once;
#  6. deleting `one` (retention Retain) removes its pods and keeps its PVCs;
#     re-created, it finds its data, broker credentials and CA again.
#
# Needs docker (with a daemon), kind, kubectl and helm. Where any is missing
# the suite is SKIPPED with a message and exits 0 (set KIND_E2E_REQUIRED=1,
# as the hosted workflow does, to make that a failure). It is never run
# from .ci/run: the machines there have no container runtime.
#
# Environment: KIND_CLUSTER (default sns-e2e), KIND_NODE_IMAGE (default:
# kind's), IMAGE (default tiny-sns:e2e), KEEP_CLUSTER=1 to leave it running,
# FAILOVER_BUDGET (s, default 30), OUT (logs, default target/kind).
set -euo pipefail
cd "$(dirname "$0")/../.."

skip() {
  echo "kind suite: SKIPPED: $*"
  echo "kind suite: it runs in the hosted workflow .github/workflows/kind-e2e.yml"
  if [ "${KIND_E2E_REQUIRED:-0}" = 1 ]; then exit 1; fi
  exit 0
}
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || skip "'$tool' is not installed"
done
docker info >/dev/null 2>&1 || skip "no Docker daemon answers (docker info failed)"

CLUSTER=${KIND_CLUSTER:-sns-e2e}
IMAGE=${IMAGE:-tiny-sns:e2e}
BROKER_IMAGE=rabbitmq:3.13-management
NS=sns-e2e
OUT=${OUT:-target/kind}
FAILOVER_BUDGET=${FAILOVER_BUDGET:-30}
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
# shellcheck source=tests/kind/lib.sh
. tests/kind/lib.sh

diagnostics() {
  log "collecting diagnostics into $OUT"
  {
    kubectl get sns,all,pvc,pdb,endpointslices -A -o wide
    kubectl describe sns -n "$NS"
    kubectl get events -n "$NS" --sort-by=.lastTimestamp
  } >"$OUT/cluster.txt" 2>&1 || true
  kubectl logs -n sns-system deploy/sns --tail=500 >"$OUT/operator.log" 2>&1 || true
  for pod in $(kubectl get pods -n "$NS" -o name 2>/dev/null); do
    kubectl logs -n "$NS" "$pod" --all-containers --prefix --tail=300 >"$OUT/${pod#pod/}.log" 2>&1 || true
  done
  tail -n 60 "$OUT/cluster.txt" "$OUT/operator.log" || true
  for f in "$OUT"/client-*.log; do
    [ -f "$f" ] && { echo "== $f"; tail -n 20 "$f"; }
  done
}

cleanup() {
  local rc=$?
  set +e
  for name in "${!CFD[@]}"; do
    eval "exec ${CFD[$name]}>&-"
  done
  for pid in "${BG_PIDS[@]}" "${CPID[@]}"; do
    kill "$pid" 2>/dev/null
  done
  [ "$rc" -ne 0 ] && diagnostics
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1
  fi
  if [ "$rc" -eq 0 ]; then
    log "kind suite: PASSED"
  else
    log "kind suite: FAILED (logs in $OUT)"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- cluster, image, operator --------------------------------------------------
log "creating kind cluster $CLUSTER"
kind_args=(--name "$CLUSTER" --wait 120s)
[ -n "${KIND_NODE_IMAGE:-}" ] && kind_args+=(--image "$KIND_NODE_IMAGE")
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster "${kind_args[@]}"
minor=$(kubectl version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -1)
[ "${minor:-0}" -ge 33 ] || log "warning: the API server is 1.$minor; the operator targets 1.33 or newer"

log "building $IMAGE"
docker build -t "$IMAGE" .
docker pull -q "$BROKER_IMAGE" >/dev/null
kind load docker-image --name "$CLUSTER" "$IMAGE" "$BROKER_IMAGE"
cid=$(docker create "$IMAGE")
docker cp "$cid:/usr/local/bin/tsc" "$OUT/tsc"
docker rm "$cid" >/dev/null
TSC=$OUT/tsc

log "installing the chart"
helm install sns charts/sns -n sns-system --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --wait --timeout 5m
kubectl get crd snsclusters.sns.io >/dev/null

log "applying SnsClusters: demo (the example) and one (a single cluster)"
kubectl create namespace "$NS"
kubectl apply -n "$NS" -f manifests/examples/snscluster.yaml
# SnsCluster one: a single cluster, volumes kept on deletion (applied again
# after its deletion, below).
apply_one() {
  kubectl apply -n "$NS" -f - <<'EOF'
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata:
  name: one
spec:
  clusters: 1
  serversPerCluster: 2
  heartbeat: {intervalMillis: 1000, missed: 2}
  storage: {size: 256Mi, retention: Retain}
EOF
}
apply_one
# The API server enforces the schema and the CEL rules the offline checks cannot.
if kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"clusters":4}}' >/dev/null 2>&1; then
  die "clusters changed although the CRD makes it immutable"
fi
if kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"storage":{"size":"2Gi"}}}' >/dev/null 2>&1; then
  die "storage.size changed although the CRD makes it immutable"
fi
if kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"broker":{"managed":{"storageClassName":"other"}}}}' >/dev/null 2>&1; then
  die "broker.managed.storageClassName changed although the CRD makes it immutable"
fi
if kubectl apply -n "$NS" -f - >/dev/null 2>&1 <<'EOF'; then
apiVersion: sns.io/v1alpha1
kind: SnsCluster
metadata: {name: bad}
spec: {broker: {managed: {}, external: {urlSecretRef: {name: x}}}}
EOF
  die "an SnsCluster with both broker kinds was accepted"
fi
if kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"coordinator":{"replicas":1}}}' >/dev/null 2>&1; then
  die "coordinator.replicas went back to 1 although the CRD refuses it"
fi
log "CEL rules enforced (clusters, storage size and broker storage class immutable, one broker kind, coordinator replicas never back to 1)"

for cr in one demo; do
  log "waiting for $cr to be Ready"
  kubectl wait -n "$NS" "sns/$cr" --for=condition=Ready --timeout=600s
done
kubectl get sns -n "$NS"
[ "$(kubectl get pods -n "$NS" -l app.kubernetes.io/instance=demo,sns.io/role=master -o name | wc -l)" -eq 3 ] ||
  die "demo should have exactly 3 pods labelled sns.io/role=master"

# --- clients through port-forward ----------------------------------------------
# Kept up in a loop: a port-forward ends with the pod it picked, and the
# coordinator's pod is replaced by an image change (the clients reconnect).
port_forward() {
  local cr=$1 port=$2
  (
    trap 'kill "$child" 2>/dev/null; exit 0' TERM
    while :; do
      kubectl port-forward -n "$NS" "svc/$cr-coordinator" "$port:9000" >>"$OUT/port-forward-$cr.log" 2>&1 &
      child=$!
      wait "$child" || true
      sleep 0.5
    done
  ) &
  BG_PIDS+=($!)
  PORT_OF[$cr]=$port
  eventually 30 "port-forward to $cr" "(exec 3<>/dev/tcp/127.0.0.1/$port)"
}
# TLS is on by default: the clients check the coordinator's certificate
# (issued for localhost and 127.0.0.1 too, for this port-forward) against
# the SnsCluster's CA, the ca.crt of its <name>-tls Secret.
extract_ca() {
  local cr=$1
  CA_OF[$cr]=$OUT/ca-$cr.crt
  kubectl get secret -n "$NS" "$cr-tls" -o jsonpath='{.data.ca\.crt}' | base64 -d >"${CA_OF[$cr]}"
  grep -q -- '-----BEGIN CERTIFICATE-----' "${CA_OF[$cr]}" || die "no CA in the Secret $cr-tls"
}
for cr in one demo; do extract_ca "$cr"; done
port_forward one 19000
port_forward demo 19100

# --- scenario 1: one cluster ---------------------------------------------------
log "scenario 1 (SnsCluster one): users 1 and 4"
client s1-1 one 1
client s1-4 one 4
poll_list s1-1 "1, 4, " ""
run s1-1 "FOLLOW 4"
run s1-4 "follow 1"
poll_list s1-1 "1, 4, " "4, "
poll_list s1-4 "1, 4, " "1, "
enter_timeline s1-1
send s1-1 p11
send s1-1 p12
enter_timeline s1-4
expect_post s1-4 1 p11
expect_post s1-4 1 p12
send s1-4 p41
send s1-4 p42
expect_post s1-1 4 p41
expect_post s1-1 4 p42
grep -Eq "$(post_re 1 'p1[12]')" "$OUT/client-s1-1.log" && die "user 1 saw its own posts"
log "scenario 1 passed"

# --- scenario 2: three clusters ------------------------------------------------
log "scenario 2 (SnsCluster demo): users 1, 2, 3 across three clusters"
for u in 1 2 3; do client "u$u" demo "$u"; done
for u in 1 2 3; do poll_list "u$u" "1, 2, 3, " ""; done
run u1 "FOLLOW 2"; run u1 "FOLLOW 3"
run u2 "FOLLOW 1"; run u2 "FOLLOW 3"
run u3 "FOLLOW 1"; run u3 "FOLLOW 2"
poll_list u1 "1, 2, 3, " "2, 3, "
poll_list u2 "1, 2, 3, " "1, 3, "
poll_list u3 "1, 2, 3, " "1, 2, "
enter_timeline u1; send u1 p11; send u1 p12
enter_timeline u2; send u2 p21; send u2 p22
expect_post u1 2 p21
expect_post u2 1 p12
enter_timeline u3
for p in p11 p12; do expect_post u3 1 "$p"; done
for p in p21 p22; do expect_post u3 2 "$p"; done
send u3 p31; send u3 p32
for u in u1 u2; do expect_post "$u" 3 p31; expect_post "$u" 3 p32; done
log "scenario 2 passed"

# --- scenario 3: kill the master of cluster 2 ---------------------------------
status_master() { kubectl get sns demo -n "$NS" -o jsonpath="{.status.clusters[?(@.cluster==$1)].master}"; }
status_alive() { kubectl get sns demo -n "$NS" -o jsonpath="{.status.clusters[?(@.cluster==$1)].masterAlive}"; }
# master_moved CLUSTER OLD: status names a live master of CLUSTER other than OLD.
master_moved() { [ "$(status_master "$1")" != "$2" ] && [ "$(status_alive "$1")" = true ]; }
log "scenario 3: deleting the master pod of cluster 2"
old=$(status_master 2)
[ -n "$old" ] || die "no master of cluster 2 in status"
kubectl delete pod -n "$NS" "$old" --grace-period=0 --force
eventually "$FAILOVER_BUDGET" "a new master of cluster 2 in status" "master_moved 2 $old"
client u5 demo 5
poll_list u5 "1, 2, 3, 5, " ""
for o in 1 2 3; do run u5 "FOLLOW $o"; done
for u in 1 2 3; do
  client "u${u}b" demo "$u"
  run "u${u}b" "FOLLOW 5"
done
poll_list u5 "1, 2, 3, 5, " "1, 2, 3, "
poll_list u1b "1, 2, 3, 5, " "2, 3, 5, "
poll_list u2b "1, 2, 3, 5, " "1, 3, 5, "
poll_list u3b "1, 2, 3, 5, " "1, 2, 5, "
enter_timeline u5
send u5 p51; send u5 p52
for u in u1 u2 u3; do expect_post "$u" 5 p51 60; expect_post "$u" 5 p52 60; done
send u3 p33; send u3 p34
send u2 p23; send u2 p24
expect_post u5 3 p33; expect_post u5 3 p34
for u in u1 u3; do expect_post "$u" 2 p23 60; expect_post "$u" 2 p24 60; done
for p in p11 p12 p21 p22 p31 p32; do
  grep -Eq ">> $p\$" "$OUT/client-u5.log" && die "user 5 saw $p, posted before it followed"
done
log "scenario 3 passed"

# --- failover drills while posting ---------------------------------------------
# User 2 (cluster 2) posts every 200 ms; user 1 (cluster 1) and user 5
# (cluster 2) follow it and must see every post exactly as typed.
drill() {
  local round=$1 grace=$2 n=40 i
  local old new
  old=$(status_master 2)
  log "drill $round: deleting master $old of cluster 2 (grace $grace) while user 2 posts"
  for i in $(seq 1 "$n"); do
    send u2 "d$round-$i"
    if [ "$i" -eq 10 ]; then
      if [ "$grace" = 0 ]; then
        kubectl delete pod -n "$NS" "$old" --grace-period=0 --force --wait=false
      else
        kubectl delete pod -n "$NS" "$old" --grace-period="$grace" --wait=false
      fi
    fi
    sleep 0.2
  done
  eventually "$FAILOVER_BUDGET" "a new live master of cluster 2 in status" "master_moved 2 $old"
  new=$(status_master 2)
  log "drill $round: status names $new as master (term $(kubectl get sns demo -n "$NS" -o jsonpath='{.status.clusters[?(@.cluster==2)].term}'))"
  eventually 30 "the master Service of cluster 2 to select $new" \
    "kubectl get endpointslices -n $NS -l kubernetes.io/service-name=demo-master-2 -o jsonpath='{.items[*].endpoints[*].targetRef.name}' | grep -qx '$new'"
  for i in $(seq 1 "$n"); do
    expect_post u1 2 "d$round-$i" 90
    expect_post u5 2 "d$round-$i" 90
  done
  for u in u1 u5; do
    local dups
    dups=$(grep -E "$(post_re 2 "d$round-[0-9]+")" "$OUT/client-$u.log" | sed 's/.*>> //' | sort | uniq -d)
    [ -z "$dups" ] || die "user ${u#u} saw posts twice: $dups"
  done
  log "drill $round: all $n posts reached users 1 and 5 once"
  eventually 180 "the old master $old to come back as slave" \
    "kubectl get pod -n $NS $old -o jsonpath='{.metadata.labels.sns\\.io/role}' | grep -qx slave"
  kubectl get events -n "$NS" --field-selector reason=Failover -o name | grep -q . || die "no Failover event"
  log "drill $round passed"
}
drill 1 0
drill 2 1
kubectl get pods -n "$NS" -L sns.io/cluster,sns.io/role

# --- operations under continuous writes ----------------------------------------
# Writers w7, w8, w9 (users 7, 8, 9: one per cluster) make acknowledged
# writes back to back; user 2 posts every 500 ms and users 1 and 5 must
# see every post once. Each operation prints each writer's longest time
# without an acknowledged write.
for u in 7 8 9; do client "w$u" demo "$u"; done
declare -a WRITER_PIDS
under_writes_start() {
  local tag=$1 u
  rm -f "$OUT/stop-writers"
  WRITER_PIDS=()
  for u in 7 8 9; do
    : >"$OUT/acks-w$u"
    writer "w$u" &
    WRITER_PIDS+=($!)
    BG_PIDS+=($!)
  done
  (
    i=0
    until [ -e "$OUT/stop-writers" ]; do
      i=$((i + 1))
      send u2 "$tag-$i"
      echo "$i" >"$OUT/posts-$tag"
      sleep 0.5
    done
  ) &
  WRITER_PIDS+=($!)
  BG_PIDS+=($!)
}
under_writes_stop() {
  local tag=$1 pid n i u dups worst=0 ms
  touch "$OUT/stop-writers"
  for pid in "${WRITER_PIDS[@]}"; do
    wait "$pid" || die "$tag: a writer failed (no answer to a write within 60 s)"
  done
  for u in 7 8 9; do
    [ "$(wc -l <"$OUT/acks-w$u")" -gt 1 ] || die "$tag: writer w$u had fewer than 2 writes acknowledged"
    ms=$(blackout "w$u")
    log "$tag: longest write blackout of user $u: ${ms} ms"
    [ "$ms" -gt "$worst" ] && worst=$ms
  done
  log "$tag: longest write blackout: ${worst} ms"
  n=$(cat "$OUT/posts-$tag")
  for i in $(seq 1 "$n"); do
    expect_post u1 2 "$tag-$i" 120
    expect_post u5 2 "$tag-$i" 120
  done
  for u in u1 u5; do
    dups=$(grep -E "$(post_re 2 "$tag-[0-9]+")" "$OUT/client-$u.log" | sed 's/.*>> //' | sort | uniq -d)
    [ -z "$dups" ] || die "$tag: user ${u#u} saw posts twice: $dups"
  done
  log "$tag: all $n posts reached users 1 and 5 once"
}
sns_field() { kubectl get sns demo -n "$NS" -o jsonpath="$1"; }
# Waits until every writer has had 3 more writes acknowledged.
writes_grow() {
  local u n
  for u in 7 8 9; do
    n=$(($(wc -l <"$OUT/acks-w$u") + 3))
    eventually 60 "writer w$u to get 3 more writes acknowledged $1" "[ \$(wc -l <$OUT/acks-w$u) -ge $n ]"
  done
}
rolled_out() {
  [ "$(sns_field '{.status.rollout.state}')" = Done ] &&
    [ "$(sns_field '{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

# An image change: the chart's new tag is also the operator's
# SNS_OPERATOR_IMAGE, so every server rolls, one at a time, slave first.
NEXT_IMAGE=${IMAGE%:*}:e2e-next
log "image change to $NEXT_IMAGE under writes"
docker tag "$IMAGE" "$NEXT_IMAGE"
kind load docker-image --name "$CLUSTER" "$NEXT_IMAGE"
under_writes_start roll
helm upgrade sns charts/sns -n sns-system --reuse-values --set image.tag="${NEXT_IMAGE##*:}" --wait --timeout 5m
eventually 120 "the rollout to start" "[ \"\$(sns_field '{.status.rollout.state}')\" != Done ]"
eventually 900 "every server on $NEXT_IMAGE, rollout Done and Ready" \
  "rolled_out && [ \"\$(sns_field '{.status.rollout.updatedServers}')\" = 6/6 ]"
for pod in $(kubectl get pods -n "$NS" -l app.kubernetes.io/instance=demo,app.kubernetes.io/component=server -o name); do
  img=$(kubectl get -n "$NS" "$pod" -o jsonpath='{.spec.containers[?(@.name=="server")].image}')
  [ "$img" = "$NEXT_IMAGE" ] || die "$pod runs $img after the roll"
done
under_writes_stop roll
kubectl get events -n "$NS" --field-selector reason=RollingUpdate -o name | grep -q . || die "no RollingUpdate event"

# A switchover asked for with the annotation: runs once, recorded in status.
log "switchover of cluster 2 via the sns.io/switchover annotation under writes"
before=$(status_master 2)
under_writes_start switch
kubectl annotate sns demo -n "$NS" sns.io/switchover=2
eventually 120 "the annotation to be taken and the switchover recorded" \
  "[ -z \"\$(sns_field '{.metadata.annotations.sns\.io/switchover}')\" ] && [ \"\$(sns_field '{.status.lastSwitchover.requestedBy}')\" = annotation ]"
[ "$(sns_field '{.status.lastSwitchover.succeeded}')" = true ] ||
  die "switchover failed: $(sns_field '{.status.lastSwitchover.message}')"
eventually 30 "status to name a new live master of cluster 2" "master_moved 2 $before"
under_writes_stop switch
log "switchover: $(sns_field '{.status.lastSwitchover.message}')"

# Scale 2 -> 1 -> 2 servers per cluster.
log "scaling demo to 1 server per cluster under writes"
under_writes_start down
kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"serversPerCluster":1}}'
eventually 900 "demo at 1 server per cluster, rolled out and Ready" \
  "rolled_out && [ \"\$(sns_field '{.status.readyServers}')\" = 3/3 ] && [ -z \"\$(kubectl get sts -n $NS -o name | grep 'demo-server-.-2')\" ]"
under_writes_stop down
log "scaling demo back to 2 servers per cluster under writes"
under_writes_start up
kubectl patch sns demo -n "$NS" --type merge -p '{"spec":{"serversPerCluster":2}}'
eventually 900 "demo at 2 servers per cluster, rolled out and Ready" \
  "rolled_out && [ \"\$(sns_field '{.status.readyServers}')\" = 6/6 ]"
under_writes_stop up
kubectl get pods -n "$NS" -L sns.io/cluster,sns.io/role

# The managed broker's pod killed: the synchronizers reconnect, the posts
# made meanwhile wait in the outboxes, and every post still reaches its
# followers once.
log "killing the broker pod under writes"
under_writes_start broker
kubectl delete pod -n "$NS" demo-rabbitmq-0 --grace-period=0 --force
eventually 300 "the broker back and demo Ready" \
  "rolled_out && [ \"\$(kubectl get pod -n $NS demo-rabbitmq-0 -o jsonpath='{.status.containerStatuses[0].ready}')\" = true ]"
under_writes_stop broker

# --- the replicated coordinator: its leader killed under writes ----------------
# demo runs two coordinator replicas (the default): one leads (the Lease's
# holder, the one ready pod), the other stands by. The leader is killed
# without a grace period, so the standby takes over once the lease runs
# out; the writers and posts must go on with nothing acknowledged lost.
coord_leader() { kubectl get lease demo-coordinator -n "$NS" -o jsonpath='{.spec.holderIdentity}'; }
coord_ready() { kubectl get sts demo-coordinator -n "$NS" -o jsonpath='{.status.readyReplicas}'; }
eventually 300 "two coordinator replicas, one ready (the leader), reported 1/2" \
  "[ \"\$(sns_field '{.status.readyCoordinators}')\" = 1/2 ] && [ -n \"\$(coord_leader)\" ]"
old_leader=$(coord_leader)
log "killing the leading coordinator $old_leader under writes"
under_writes_start coord
writes_grow "before the kill"
killed_at=$(date +%s%N)
kubectl delete pod -n "$NS" "$old_leader" --grace-period=0 --force --wait=false
eventually 60 "a standby to take the lease over and become ready" \
  "leader=\$(coord_leader) && [ -n \"\$leader\" ] && [ \"\$leader\" != $old_leader ] && [ \"\$(coord_ready)\" = 1 ]"
took_ms=$((($(date +%s%N) - killed_at) / 1000000))
log "coordinator takeover: $(coord_leader) leads and is ready ${took_ms} ms after $old_leader was killed"
eventually "$FAILOVER_BUDGET" "demo Ready again" \
  "[ \"\$(sns_field '{.status.conditions[?(@.type==\"Ready\")].status}')\" = True ]"
writes_grow "after the takeover"
under_writes_stop coord
eventually 180 "the killed replica back as a standby (1/2 ready)" \
  "[ \"\$(kubectl get sts demo-coordinator -n $NS -o jsonpath='{.status.replicas}')\" = 2 ] && [ \"\$(sns_field '{.status.readyCoordinators}')\" = 1/2 ]"
kubectl get configmap demo-coordinator-records -n "$NS" -o jsonpath='{.data.leader}' | grep -q . ||
  die "the records ConfigMap names no leader"

# --- deletion honours retention -------------------------------------------------
log "deleting SnsCluster one (retention Retain)"
kubectl delete sns one -n "$NS" --wait --timeout=120s
eventually 120 "one's pods to go" \
  "[ -z \"\$(kubectl get pods -n $NS -l app.kubernetes.io/instance=one -o name)\" ]"
kubectl get pvc -n "$NS" data-one-server-1-1-0 data-one-server-1-2-0 >/dev/null ||
  die "Retain should have kept one's PersistentVolumeClaims"
log "PVCs kept after deletion"

# Re-created with the same name: its kept volumes, broker credentials, node
# secret and CA are found again, so the data is there, the synchronizers
# log in to the kept broker, and clients trust the same CA.
old_ca=$(cat "${CA_OF[one]}")
log "re-creating SnsCluster one"
apply_one
eventually 300 "one Ready again" \
  "[ \"\$(kubectl get sns one -n $NS -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" = True ]"
extract_ca one
[ "$(cat "${CA_OF[one]}")" = "$old_ca" ] || die "one's CA changed across re-creation with Retain"
eventually 120 "one's synchronizers logged in to the kept broker" \
  "kubectl logs -n $NS one-server-1-1-0 -c synchronizer | grep -q 'connected to server and broker'"
if kubectl logs -n "$NS" one-server-1-1-0 -c synchronizer | grep -q ACCESS_REFUSED; then
  die "the re-created one's synchronizer was refused by the broker"
fi
client s1b-1 one 1
poll_list s1b-1 "1, 4, " "4, "
log "re-created one has its users and follows from before the deletion"
