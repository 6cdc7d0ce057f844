#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for sluice's tests: etcd, kube-apiserver
# (TLS, RBAC) and kube-controller-manager, built once from the Go module proxy.
#
#   scripts/k8s-env.sh install   build the binaries into the cache (once per version set)
#   scripts/k8s-env.sh up        start the control plane; prints the env file to source
#   scripts/k8s-env.sh down      stop exactly the processes `up` started, remove its data
#   scripts/k8s-env.sh env       print the env file path (after `up`)
#   scripts/k8s-env.sh status    is it running?
#   scripts/k8s-env.sh stop-apiserver | start-apiserver
#                                 stop / restart only kube-apiserver (same port and data), for
#                                 tests of API-server outages
#
# Cache: ${SLUICE_CACHE:-~/.cache/sluice}/testenv/bin (each binary keyed by its own inputs)
# State: ${SLUICE_K8S_STATE:-${TMPDIR:-/tmp}/sluice-k8s} (certs, data, logs, pids, kubeconfig)
# SLUICE_K8S_ADDRESS (default 127.0.0.1) is the API server's bind and advertise address,
# SLUICE_K8S_API_PORT its port (default: a free one) and SLUICE_K8S_CONTROLLERS the
# controller manager's controllers: scripts/cluster.sh sets them to run this control plane
# inside its network namespace, where a kubelet and pods reach it on the node's address.
# With SLUICE_TEST_KUBECONFIG set to an existing cluster's kubeconfig (kind, k3d), `up` only
# checks that it answers and `down` does nothing.
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
GO_DIR=$ROOT/scripts/go
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
STATE=${SLUICE_K8S_STATE:-${TMPDIR:-/tmp}/sluice-k8s}
ADDRESS=${SLUICE_K8S_ADDRESS:-127.0.0.1}
CONTROLLERS=${SLUICE_K8S_CONTROLLERS:-garbagecollector,namespace,deployment,replicaset,serviceaccount,serviceaccount-token,disruption}

log() { printf '[k8s-env] %s\n' "$*" >&2; }
die() { printf '[k8s-env] error: %s\n' "$*" >&2; exit 1; }

version_of() { # module-dir module-path -> version from go.mod
  awk -v m="$2" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$GO_DIR/$1/go.mod"
}

bin_dir() { echo "$CACHE/testenv/bin"; }

# Each binary is rebuilt only when what it is built from changes: its module's files under
# scripts/go/<dir> (go.mod, go.sum, main.go), the package, the flags and the Go toolchain. Its
# key is kept next to it (.key-<name>), so one module's update relinks only its own binaries,
# and a change to this script relinks none.
build() { # module-dir package output [ldflags] [build tags]
  local dir=$1 pkg=$2 out=$3 ldflags=${4:-} tags=${5:-} key keyfile
  keyfile=$(dirname "$out")/.key-$(basename "$out")
  key=$( { cat "$GO_DIR/$dir"/*; printf '%s\n' "$pkg" "$ldflags" "$tags" "$GO_VERSION"; } | sha256sum | cut -c1-16)
  if [ -x "$out" ] && [ "$(cat "$keyfile" 2>/dev/null || true)" = "$key" ]; then return 0; fi
  log "building $(basename "$out") from $pkg"
  (cd "$GO_DIR/$dir" && CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  echo "$key" >"$keyfile"
}

cmd_install() {
  command -v go >/dev/null || die "Go is required to build the test control plane (none on PATH)"
  local bin kube etcd_v helm_v stamp start
  bin=$(bin_dir)
  mkdir -p "$bin"
  # Binaries of the earlier layout (one directory per hash of all modules) are of no further use.
  find "$CACHE/testenv" -mindepth 1 -maxdepth 1 -type d ! -name bin -exec rm -rf {} +
  GO_VERSION=$(go env GOVERSION)
  start=$(date +%s)
  kube=$(awk '/k8s.io\/kubernetes v/ {print $2; exit}' "$GO_DIR/kubernetes/go.mod")
  local minor=${kube#v1.}; minor=${minor%%.*}
  local kv="-X k8s.io/component-base/version.gitVersion=$kube -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$kube -X k8s.io/component-base/version.gitTreeState=clean"
  for c in kube-apiserver kube-controller-manager kubectl kubelet kube-proxy kube-scheduler; do
    build kubernetes "k8s.io/kubernetes/cmd/$c" "$bin/$c" "$kv"
  done
  etcd_v=$(version_of etcd go.etcd.io/etcd/server/v3)
  build etcd go.etcd.io/etcd/server/v3 "$bin/etcd" "-X go.etcd.io/etcd/api/v3/version.Version=${etcd_v#v}"
  helm_v=$(version_of helm helm.sh/helm/v3)
  build helm helm.sh/helm/v3/cmd/helm "$bin/helm" "-X helm.sh/helm/v3/internal/version.version=$helm_v"
  build kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$bin/kubeconform"
  build actionlint github.com/rhysd/actionlint/cmd/actionlint "$bin/actionlint"
  build coredns . "$bin/coredns"
  build pause . "$bin/pause"
  # Debian's prometheus has no Kubernetes service discovery; this one has only that one.
  local prom_v; prom_v=$(version_of prometheus github.com/prometheus/prometheus)
  build prometheus github.com/prometheus/prometheus/cmd/prometheus "$bin/prometheus" \
    "-X github.com/prometheus/common/version.Version=$prom_v" remove_all_sd,enable_kubernetes_sd
  stamp=$(( $(date +%s) - start ))
  log "binaries in $bin (${stamp}s this run; $(du -sh "$bin" | cut -f1) on disk)"
  echo "$bin"
}

quiet() { # cmd... ; its output only when it fails
  local out
  out=$("$@" 2>&1) || { local rc=$?; printf '%s\n' "$out" >&2; return "$rc"; }
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

gen_certs() { # dir
  local d=$1
  (
    cd "$d"
    quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 7 -subj "/CN=sluice-test-ca"
    cat >serving.ext <<EXT
subjectAltName=IP:127.0.0.1,IP:$ADDRESS,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth
EXT
    quiet openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    quiet openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 7 -extfile serving.ext
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    client() { # name CN O
      quiet openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2${3:+/O=$3}"
      quiet openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 7 -extfile client.ext
    }
    client admin kubernetes-admin system:masters
    # With one identity for all controllers (no per-controller service-account credentials),
    # the controller manager needs the rights of all of them: a test-only shortcut.
    client controller-manager system:kube-controller-manager system:masters
    quiet openssl genrsa -out sa.key 2048
    quiet openssl rsa -in sa.key -pubout -out sa.pub
  )
}

kubeconfig() { # file server user
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: $2
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $3
  user:
    client-certificate: $STATE/pki/$3.crt
    client-key: $STATE/pki/$3.key
contexts:
- name: sluice-test
  context: {cluster: sluice-test, user: $3, namespace: default}
current-context: sluice-test
KC
}

start() { # name cmd... ; runs detached, logs to $STATE/logs/name.log, records the PID
  local name=$1; shift
  printf '%q ' "$@" >"$STATE/$name.cmd"
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  local pid=$!
  if [ -f "$STATE/pids" ]; then
    awk -v n="$name" '$2 != n' "$STATE/pids" >"$STATE/pids.new" && mv "$STATE/pids.new" "$STATE/pids"
  fi
  echo "$pid $name" >>"$STATE/pids"
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$what not ready after ${secs}s; last log lines:"
      tail -n 30 "$STATE/logs/$what.log" >&2 || true
      cmd_down
      die "$what did not become ready"
    fi
    sleep 0.3
  done
}

write_env() { # kubeconfig
  local bin; bin=$(bin_dir)
  cat >"$STATE/env" <<ENV
export SLUICE_TEST_KUBECONFIG=$1
export KUBECONFIG=$1
export SLUICE_K8S_BIN=$bin
export SLUICE_K8S_STATE=$STATE
export SLUICE_K8S_LOCAL=${2:-0}
export PATH=$bin:\$PATH
ENV
  echo "$STATE/env"
}

cmd_up() {
  mkdir -p "$STATE"
  if [ -n "${SLUICE_TEST_KUBECONFIG:-}" ] && [ ! -f "$STATE/pids" ]; then
    local kc=$SLUICE_TEST_KUBECONFIG
    [ -f "$kc" ] || die "SLUICE_TEST_KUBECONFIG=$kc does not exist"
    "$(bin_dir)/kubectl" --kubeconfig "$kc" get --raw /readyz >/dev/null ||
      die "the cluster in SLUICE_TEST_KUBECONFIG=$kc does not answer"
    log "using the existing cluster in $kc"
    write_env "$kc"
    return
  fi
  if cmd_status >/dev/null 2>&1; then
    log "already running"
    write_env "$STATE/admin.kubeconfig" 1
    return
  fi
  local bin; bin=$(bin_dir)
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "$bin/$b" ] || die "$bin/$b is missing: run scripts/k8s-env.sh install first"
  done
  local t0; t0=$(date +%s%N)
  rm -rf "$STATE"/{pki,etcd,logs,pids,env,*.kubeconfig}
  mkdir -p "$STATE/pki" "$STATE/logs"
  gen_certs "$STATE/pki"
  local etcd_port peer_port api_port cm_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=${SLUICE_K8S_API_PORT:-$(free_port)}; cm_port=$(free_port)
  local server="https://$ADDRESS:$api_port"

  start etcd "$bin/etcd" --name sluice-test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "sluice-test=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$ADDRESS" --advertise-address "$ADDRESS" --secure-port "$api_port" \
    --kubelet-client-certificate "$STATE/pki/admin.crt" --kubelet-client-key "$STATE/pki/admin.key" \
    --kubelet-preferred-address-types InternalIP \
    --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
    --client-ca-file "$STATE/pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$STATE/pki/sa.pub" --service-account-signing-key-file "$STATE/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true \
    --enable-priority-and-fairness=false --profiling=false --v=1
  kubeconfig "$STATE/admin.kubeconfig" "$server" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" "$server" controller-manager
  wait_for kube-apiserver 60 "$bin/kubectl" --kubeconfig "$STATE/admin.kubeconfig" get --raw /readyz

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$cm_port" --leader-elect=false \
    --controllers "$CONTROLLERS" \
    --service-account-private-key-file "$STATE/pki/sa.key" --root-ca-file "$STATE/pki/ca.crt" \
    --use-service-account-credentials=false --profiling=false --v=1
  wait_for kube-controller-manager 60 curl -skf "https://127.0.0.1:$cm_port/healthz"
  # The default ServiceAccount appearing shows the controllers are doing their work.
  wait_for kube-controller-manager 60 "$bin/kubectl" --kubeconfig "$STATE/admin.kubeconfig" -n default get serviceaccount default

  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  log "control plane ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s at $server (logs in $STATE/logs)"
  write_env "$STATE/admin.kubeconfig" 1
}

pid_of() { [ ! -f "$STATE/pids" ] || awk -v n="$1" '$2 == n {print $1}' "$STATE/pids"; }

cmd_stop_apiserver() {
  local pid; pid=$(pid_of kube-apiserver)
  [ -n "$pid" ] || die "no kube-apiserver started by this script (is the control plane up?)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  log "stopped kube-apiserver ($pid)"
}

cmd_start_apiserver() {
  [ -f "$STATE/kube-apiserver.cmd" ] || die "kube-apiserver was never started by this script"
  local pid; pid=$(pid_of kube-apiserver)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then die "kube-apiserver is running ($pid)"; fi
  eval "start kube-apiserver $(cat "$STATE/kube-apiserver.cmd")"
  wait_for kube-apiserver 60 "$(bin_dir)/kubectl" --kubeconfig "$STATE/admin.kubeconfig" get --raw /readyz
  log "kube-apiserver restarted ($(pid_of kube-apiserver))"
}

cmd_down() {
  [ -f "$STATE/pids" ] || { log "nothing to stop"; return 0; }
  local pid name
  # Stop in reverse start order; only the PIDs recorded by `up`.
  tac "$STATE/pids" | while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      log "stopped $name ($pid)"
    fi
  done
  rm -rf "$STATE"/{etcd,pids,env,*.cmd}
}

cmd_status() {
  [ -f "$STATE/pids" ] || { echo "not running"; return 1; }
  local pid name ok=0
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then echo "$name: running ($pid)"; else echo "$name: dead ($pid)"; ok=1; fi
  done <"$STATE/pids"
  return $ok
}

case ${1:-} in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  env) if [ -f "$STATE/env" ]; then echo "$STATE/env"; else die "not up"; fi ;;
  status) cmd_status ;;
  stop-apiserver) cmd_stop_apiserver ;;
  start-apiserver) cmd_start_apiserver ;;
  *) echo "usage: $0 install|up|down|env|status|stop-apiserver|start-apiserver" >&2; exit 2 ;;
esac
