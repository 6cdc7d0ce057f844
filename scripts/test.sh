#!/usr/bin/env bash
# Runs all of sluice's checks and tests, installing what they need first:
#   formatting, clippy, rustdoc, a Python venv with the official `openai` client, llama.cpp's
#   llama-server with the Gemma 3 270M model (scripts/llama.sh), Debian's container tools,
#   sluice's image (scripts/image.sh), the local Kubernetes control plane (built once into
#   ~/.cache/sluice), then the whole cargo test suite; last, a single-node cluster with real
#   pods in its own network namespace (scripts/cluster.sh) and tests/k8s_pods.rs inside it.
#   Both clusters are stopped at the end, also when a test fails.
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
cd "$(dirname "$0")/.."

# Where the time goes: every step's wall time, printed when the script ends (also on failure).
STARTED=$(date +%s)
STEP_NAME=
STEP_STARTED=$STARTED
TIMES=()
end_step() {
  [ -n "$STEP_NAME" ] && TIMES+=("$(printf '%5ds  %s' $(($(date +%s) - STEP_STARTED)) "$STEP_NAME")")
  STEP_NAME=
}
step() {
  end_step
  STEP_NAME=${*%% (*}
  STEP_STARTED=$(date +%s)
  printf '\n==> %s\n' "$*"
}
summary() {
  end_step
  printf '\n==> time per step\n' >&2
  [ ${#TIMES[@]} -eq 0 ] || printf '%s\n' "${TIMES[@]}" >&2
  printf '%5ds  total\n' $(($(date +%s) - STARTED)) >&2
}
trap summary EXIT

step "toolchain components"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
# k8s_pods is `test = false` (it runs only inside the cluster), so --all-targets leaves it out.
cargo clippy --locked --test k8s_pods -- -D warnings

step "cargo doc --no-deps (warnings, broken intra-doc links included, are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet

step "Python venv for the openai client (tests/requirements.txt)"
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
VENV=$CACHE/venv
stamp=$(sha256sum tests/requirements.txt | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.sluice-stamp" 2>/dev/null)" != "$stamp" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$stamp" >"$VENV/.sluice-stamp"
fi
export SLUICE_PYTHON=$VENV/bin/python
"$SLUICE_PYTHON" -c 'import openai; print("openai", openai.__version__)'

step "Prometheus and promtool (Debian package, unpacked into the cache; no service is started)"
PROM=$CACHE/prometheus
if [ ! -x "$PROM/usr/bin/prometheus" ] || [ ! -x "$PROM/usr/bin/promtool" ]; then
  dl=$(mktemp -d)
  if ! (cd "$dl" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq
    (cd "$dl" && apt-get download prometheus)
  fi
  mkdir -p "$PROM" && dpkg-deb -x "$dl"/prometheus_*.deb "$PROM"
  rm -rf "$dl"
fi
export SLUICE_PROMETHEUS_BIN=$PROM/usr/bin
"$SLUICE_PROMETHEUS_BIN/prometheus" --version 2>&1 | head -n 1

step "a real engine: llama.cpp's llama-server and Gemma 3 270M (scripts/llama.sh; built once into the cache, about 8 minutes the first time)"
# shellcheck disable=SC1090
source "$(scripts/llama.sh)"

step "container tools and shellcheck (Debian: containerd, runc, CNI plugins, buildah, iptables, shellcheck)"
missing=()
for p in containerd runc containernetworking-plugins buildah iptables shellcheck; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

step "sluice's image (scripts/image.sh: release build, buildah from scratch on Debian packages)"
SLUICE_IMAGE_ARCHIVE=$(scripts/image.sh build)
export SLUICE_IMAGE_ARCHIVE

step "local Kubernetes control plane (scripts/k8s-env.sh)"
scripts/k8s-env.sh install >/dev/null
trap 'scripts/k8s-env.sh down || true; scripts/cluster.sh down || true; summary' EXIT
env_file=$(scripts/k8s-env.sh up)
# shellcheck disable=SC1090
source "$env_file"

step "cargo test build (debug profile)"
cargo test --locked --no-run

step "cargo test"
cargo test --locked --no-fail-fast

step "real pods: a single-node cluster in network namespace sluice-k8s (scripts/cluster.sh), from a fresh boot's /run (scripts/fresh-boot.sh)"
scripts/k8s-env.sh down
cargo test --locked --no-run --test k8s_pods
scripts/fresh-boot.sh scripts/cluster.sh run --load "$SLUICE_IMAGE_ARCHIVE" \
  cargo test --locked --offline --test k8s_pods
