#!/usr/bin/env bash
# An engine killed mid-run (docs/benchmarks.md, "A fleet of engines"): three simulated engines
# on 127.0.0.1 (two fast, one at half speed, as benches/fleet.rs), one `sluice gateway` listing
# them, `sluice loadgen` at RATE req/s (default 26.4, the fleet's capacity) for 40 s, and
# `kill -9` of a fast engine 15 s in. Prints the load generator's report, the per-second
# outcomes around the kill, when it happened and the gateway's ejection lines.
#   cargo build --release && scripts/fleet-kill.sh [OUT_DIR]
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
SLUICE=${SLUICE:-$(dirname "$0")/../target/release/sluice}
OUT=${1:-$(mktemp -d)}
RATE=${RATE:-26.4}
mkdir -p "$OUT"
pids=()
# Every process this script started is stopped by PID, also on failure.
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
fast=(--max-num-seqs 16 --decode-step-ms 6 --decode-step-ms-per-seq 0.6 --prefill-ms-per-token 0.2)
slow=(--max-num-seqs 16 --decode-step-ms 12 --decode-step-ms-per-seq 1.2 --prefill-ms-per-token 0.4)
"$SLUICE" sim-engine --listen 127.0.0.1:18001 --seed 1 "${fast[@]}" 2>"$OUT/engine1.log" &
victim=$!
pids+=("$victim")
"$SLUICE" sim-engine --listen 127.0.0.1:18002 --seed 2 "${fast[@]}" 2>"$OUT/engine2.log" &
pids+=($!)
"$SLUICE" sim-engine --listen 127.0.0.1:18003 --seed 3 "${slow[@]}" 2>"$OUT/engine3.log" &
pids+=($!)
cat >"$OUT/policy.yaml" <<'YAML'
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: fleet}
spec:
  upstream: {url: 'http://127.0.0.1:18001'}
  defaults: {ttft: 500ms, itl: 48ms}
YAML
sleep 1
"$SLUICE" gateway --listen 127.0.0.1:18080 --policy-file "$OUT/policy.yaml" \
  --upstream http://127.0.0.1:18001 --upstream http://127.0.0.1:18002 \
  --upstream http://127.0.0.1:18003 2>"$OUT/gateway.log" &
pids+=($!)
sleep 1
"$SLUICE" loadgen --url http://127.0.0.1:18080 --rate "$RATE" --duration 40s \
  --prompt-chars 500-3000 --output-tokens 32-128 --ttft-slo 1s --itl-slo 60ms --timeout 30s \
  --seed 7 --quiet --json "$OUT/report.json" >"$OUT/report.txt" 2>&1 &
loadgen=$!
pids+=("$loadgen")
sleep 15
killed=$(date -u +%H:%M:%S.%N)
kill -9 "$victim"
wait "$loadgen"
cat "$OUT/report.txt"
echo "engine 127.0.0.1:18001 killed at $killed UTC (the load generator's second 14-15)"
python3 -c '
import json, sys
for s in json.load(open(sys.argv[1]))["series"][10:22]:
    print("second", s["t"], "sent", s["offered"], "good", s["good"], "shed", s["rejected"], "errors", s["errors"])
' "$OUT/report.json"
grep -E "ejected|back in the fleet" "$OUT/gateway.log" || true
