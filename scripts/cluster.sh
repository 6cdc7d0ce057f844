#!/usr/bin/env bash
# A single-node Kubernetes cluster that runs real pods, entirely inside one network namespace:
# the control plane of scripts/k8s-env.sh, plus containerd (CRI) with runc and a CNI bridge,
# kubelet, kube-proxy (iptables), kube-scheduler and CoreDNS, all built or installed like the
# control plane. Nothing in it is ever addressed from outside the namespace: its node, pod and
# Service addresses would be routed off this machine there. Test clients run inside it
# (`scripts/cluster.sh exec CMD`).
#
#   scripts/cluster.sh install        build the binaries and the pause image (once, cached)
#   scripts/cluster.sh up             start it all
#   scripts/cluster.sh load ARCHIVE   import a docker-archive image into the node's containerd
#   scripts/cluster.sh exec CMD...    run CMD inside the namespace, with the cluster's env
#   scripts/cluster.sh down           delete the pods through the API, stop every recorded PID,
#                                     remove containers, mounts, cgroups and the namespace
#   scripts/cluster.sh run [--load ARCHIVE]... CMD...
#                                     up, load each archive, exec CMD, and down whatever
#                                     happens; exits with CMD's status (scripts/test.sh runs
#                                     it under scripts/fresh-boot.sh)
#
# Requires root and Debian's containerd, runc, containernetworking-plugins and iptables.
# Test-only shortcuts: every node component uses the admin (system:masters) kubeconfig and the
# kubelet authorizes every authenticated request.
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NS=${SLUICE_NETNS:-sluice-k8s}
STATE=${SLUICE_CLUSTER_STATE:-${TMPDIR:-/tmp}/sluice-cluster}
NODE=sluice-node
NODE_IP=10.99.0.1
POD_CIDR=10.244.0.0/24
API_PORT=6443
CGROUP=$NS   # the kubelet's cgroup root, one per cluster
NSENTER=(nsenter "--net=/run/netns/$NS")
CNI_BIN=/usr/lib/cni
PAUSE_IMAGE=localhost/sluice-pause:1

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

bin_dir() { "$ROOT/scripts/k8s-env.sh" install; }

pause_archive() { echo "${SLUICE_CACHE:-$HOME/.cache/sluice}/image/pause.tar"; }

cmd_install() {
  local bin archive c
  bin=$(bin_dir)
  for t in containerd containerd-shim-runc-v2 runc ctr iptables nsenter buildah; do
    command -v "$t" >/dev/null || die "$t is missing (apt-get install containerd runc containernetworking-plugins iptables buildah)"
  done
  [ -x "$CNI_BIN/bridge" ] || die "$CNI_BIN/bridge is missing (apt-get install containernetworking-plugins)"
  archive=$(pause_archive)
  if [ ! -s "$archive" ]; then
    log "building the pause image $PAUSE_IMAGE"
    mkdir -p "$(dirname "$archive")"
    c=$(buildah from scratch)
    buildah copy --quiet "$c" "$bin/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    buildah commit --quiet --rm --timestamp 0 "$c" "$PAUSE_IMAGE" >/dev/null
    buildah push --quiet "$PAUSE_IMAGE" "docker-archive:$archive.tmp:$PAUSE_IMAGE" >/dev/null
    mv "$archive.tmp" "$archive"
  fi
  echo "$bin"
}

in_ns() { "${NSENTER[@]}" "$@"; }

# The pod network namespaces containerd pins under /run/netns (cni-*), sorted. On a freshly
# booted machine /run/netns does not exist until the first `ip netns add`: then there are none.
netns_pins() {
  [ -d /run/netns ] || return 0
  find /run/netns -maxdepth 1 -name 'cni-*' -printf '%f\n' | sort
}

start() { # name cmd... ; detached inside the namespace, logs in $STATE/logs, PID recorded
  local name=$1; shift
  setsid "${NSENTER[@]}" "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$STATE/pids"
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  local pid=
  [ -f "$STATE/pids" ] && pid=$(awk -v n="$what" '$2 == n {print $1}' "$STATE/pids")
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ] || { [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; }; then
      log "$what not ready after ${secs}s; last log lines:"
      tail -n 30 "$STATE/logs/$what.log" >&2 2>/dev/null || true
      cmd_down || true
      die "$what did not become ready"
    fi
    sleep 0.3
  done
}

kubectl() { in_ns "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

write_configs() {
  mkdir -p "$STATE"/{logs,cni/net.d,containerd,kubelet,pod-logs,runc}
  cat >"$STATE/containerd/config.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$STATE/containerd/containerd.sock"
[ttrpc]
  address = "$STATE/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
        Root = "$STATE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$STATE/cni/net.d"
EOF
  cat >"$STATE/cni/net.d/10-sluice.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "sluice", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$STATE/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
  # What pods with dnsPolicy: Default (and CoreDNS itself) get: nothing outside the cluster.
  printf 'nameserver %s\n' "$NODE_IP" >"$STATE/resolv.conf"
  # What a test client inside the namespace bind-mounts over /etc/resolv.conf to resolve
  # Service names as a pod does.
  printf 'nameserver %s\nsearch svc.cluster.local cluster.local\noptions ndots:5\n' "$NODE_IP" >"$STATE/client-resolv.conf"
  cat >"$STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failSwapOn: false
enforceNodeAllocatable: []
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $STATE/resolv.conf
podLogsDir: $STATE/pod-logs
containerRuntimeEndpoint: unix://$STATE/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
EOF
  cat >"$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $KUBECONFIG_FILE}
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0}
EOF
  cat >"$STATE/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $KUBECONFIG_FILE
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "the cluster needs root (network namespace, containerd, kubelet)"
  if [ -e "/run/netns/$NS" ] || [ -d "$STATE" ]; then
    log "removing what an earlier run left (namespace $NS, $STATE)"
    cmd_down
  fi
  BIN=$(cmd_install)
  local t0; t0=$(date +%s%N)
  rm -rf "$STATE"; mkdir -p "$STATE/logs"

  # Pod network namespaces containerd pins under /run/netns (cni-*) that were there before.
  netns_pins >"$STATE/cni-pins-before"
  ip netns add "$NS"
  in_ns ip link set lo up
  in_ns ip link add sluice0 type bridge
  in_ns ip addr add "$NODE_IP/24" dev sluice0
  in_ns ip link set sluice0 up
  in_ns ip route add default dev sluice0
  in_ns sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

  # The control plane, inside the namespace on the node's address.
  # (Not an existing cluster some caller's environment names.)
  in_ns env -u SLUICE_TEST_KUBECONFIG -u KUBECONFIG \
    SLUICE_K8S_STATE="$STATE/control-plane" SLUICE_K8S_ADDRESS=$NODE_IP SLUICE_K8S_API_PORT=$API_PORT \
    SLUICE_K8S_CONTROLLERS=garbagecollector,namespace,deployment,replicaset,serviceaccount,serviceaccount-token,disruption,endpoint,endpointslice,root-ca-cert-publisher,podgc,job,ttl-after-finished,nodelifecycle \
    "$ROOT/scripts/k8s-env.sh" up >/dev/null
  KUBECONFIG_FILE=$STATE/control-plane/admin.kubeconfig
  PKI=$STATE/control-plane/pki
  write_configs

  start containerd containerd --config "$STATE/containerd/config.toml"
  wait_for containerd 30 ctr --address "$STATE/containerd/containerd.sock" version
  cmd_load "$(pause_archive)"

  # The kubelet's cgroup root, in every hierarchy; cpuset needs its CPUs and memory nodes.
  for ctl in /sys/fs/cgroup/*/; do
    [ -d "$ctl$CGROUP" ] || mkdir "$ctl$CGROUP"
    for f in cpuset.cpus cpuset.mems; do
      [ -f "$ctl$f" ] && cat "$ctl$f" >"$ctl$CGROUP/$f"
    done
  done
  start kubelet "$BIN/kubelet" --config "$STATE/kubelet/config.yaml" --kubeconfig "$KUBECONFIG_FILE" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet/pki" --v=1
  start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml" --v=1
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$KUBECONFIG_FILE" \
    --authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false --v=1
  start coredns "$BIN/coredns" -conf "$STATE/Corefile"
  wait_for kubelet 60 kubectl get node "$NODE"
  wait_for kubelet 60 kubectl wait --for=condition=Ready "node/$NODE" --timeout=1s
  wait_for coredns 30 in_ns curl -sf http://127.0.0.1:8181/ready
  wait_for kube-proxy 30 in_ns curl -sf http://127.0.0.1:10256/healthz

  # Sourced outside the namespace, this environment would send kubectl to 10.99.0.1 off the
  # machine: it refuses.
  cat >"$STATE/env" <<ENV
if [ "\$(stat -L -c %d:%i /proc/self/ns/net)" != "\$(stat -L -c %d:%i /run/netns/$NS 2>/dev/null)" ]; then
  echo "[cluster] this environment is for use inside network namespace $NS only: scripts/cluster.sh exec CMD" >&2
  return 1 2>/dev/null || exit 1
fi
export SLUICE_TEST_KUBECONFIG=$KUBECONFIG_FILE
export KUBECONFIG=$KUBECONFIG_FILE
export SLUICE_K8S_BIN=$BIN
export SLUICE_NETNS=$NS
export SLUICE_CLUSTER_STATE=$STATE
export SLUICE_CLUSTER_CONTAINERD=$STATE/containerd/containerd.sock
export SLUICE_CLUSTER_RESOLV_CONF=$STATE/client-resolv.conf
export PATH=$BIN:\$PATH
ENV
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  log "node $NODE Ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s (namespace $NS, API https://$NODE_IP:$API_PORT, logs in $STATE/logs); use it with scripts/cluster.sh exec CMD"
}

cmd_load() { # archive
  [ -s "$1" ] || die "no image archive at $1"
  ctr --address "$STATE/containerd/containerd.sock" -n k8s.io images import --no-unpack=false "$1" >/dev/null
  log "imported $(basename "$1")"
}

cmd_exec() {
  [ -f "$STATE/env" ] || die "the cluster is not up"
  # shellcheck disable=SC2016 # expanded by the inner bash
  in_ns bash -c 'source "$0" && exec "$@"' "$STATE/env" "$@"
}

cmd_down() {
  [ -f "$STATE/pids" ] || [ -e "/run/netns/$NS" ] || { log "nothing to stop"; return 0; }
  local kc=$STATE/control-plane/admin.kubeconfig bin pid name
  bin=$("$ROOT/scripts/k8s-env.sh" install 2>/dev/null) || true
  # Pods first, through the API while the kubelet runs, so that CNI and volume cleanup happen.
  if [ -f "$kc" ] && [ -e "/run/netns/$NS" ] && in_ns "$bin/kubectl" --kubeconfig "$kc" get --raw /readyz >/dev/null 2>&1; then
    in_ns "$bin/kubectl" --kubeconfig "$kc" delete deployments,replicasets,daemonsets,statefulsets,jobs --all -A --wait=false >/dev/null 2>&1 || true
    in_ns "$bin/kubectl" --kubeconfig "$kc" delete pods --all -A --grace-period=2 --timeout=60s >/dev/null 2>&1 ||
      log "some pods were not deleted through the API; removing their containers directly"
  fi
  if [ -f "$STATE/pids" ]; then
    tac "$STATE/pids" | while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        log "stopped $name ($pid)"
      fi
    done
    rm -f "$STATE/pids"
  fi
  if [ -d "$STATE/control-plane" ]; then
    SLUICE_K8S_STATE=$STATE/control-plane "$ROOT/scripts/k8s-env.sh" down || true
  fi
  # Containers that outlived their shims, then the shims of this containerd.
  if [ -d "$STATE/runc/k8s.io" ]; then
    for id in $(runc --root "$STATE/runc/k8s.io" list -q 2>/dev/null); do
      runc --root "$STATE/runc/k8s.io" kill "$id" KILL 2>/dev/null || true
      runc --root "$STATE/runc/k8s.io" delete --force "$id" 2>/dev/null || true
    done
  fi
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $STATE/containerd/containerd.sock" 2>/dev/null || true
  # Mounts under the state directory (overlay roots, secrets, pod netns pins), deepest first.
  awk -v s="$STATE/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # Pod network namespaces whose pods were never deleted through the API (a dead kubelet).
  if [ -f "$STATE/cni-pins-before" ]; then
    netns_pins | comm -13 "$STATE/cni-pins-before" - | while read -r pin; do
        umount "/run/netns/$pin" 2>/dev/null || true
        rm -f "/run/netns/$pin" && log "removed pod network namespace $pin"
      done
  fi
  # Pod cgroups, deepest first.
  for ctl in /sys/fs/cgroup/*/; do
    if [ -d "$ctl$CGROUP" ]; then
      find "$ctl$CGROUP" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
  done
  [ -e "/run/netns/$NS" ] && ip netns delete "$NS" && log "deleted network namespace $NS"
  rm -rf "$STATE"
}

cmd_run() { # [--load ARCHIVE]... CMD...
  local archives=()
  while [ "${1:-}" = --load ]; do
    [ $# -ge 2 ] || die "--load needs an archive"
    archives+=("$2"); shift 2
  done
  [ $# -gt 0 ] || die "usage: $0 run [--load ARCHIVE]... CMD..."
  trap 'cmd_down' EXIT
  cmd_up >/dev/null
  BIN=$(bin_dir)
  local a
  for a in ${archives[@]+"${archives[@]}"}; do cmd_load "$a"; done
  cmd_exec "$@"
}

case ${1:-} in
  install) cmd_install >/dev/null ;;
  up) cmd_up ;;
  load) shift; BIN=$(bin_dir); cmd_load "$1" ;;
  exec) shift; cmd_exec "$@" ;;
  down) cmd_down ;;
  run) shift; cmd_run "$@" ;;
  *) echo "usage: $0 install|up|load ARCHIVE|exec CMD...|down|run [--load ARCHIVE]... CMD..." >&2; exit 2 ;;
esac
