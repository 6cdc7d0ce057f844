#!/usr/bin/env bash
# Runs CMD as it would run on a freshly booted machine: in a private mount namespace where /run
# is a new, empty tmpfs, as boot leaves it. Nothing an earlier run created there is visible:
# no /run/netns (created by the first `ip netns add`), no containerd or runc run state, no
# iptables lock. The host's /run is untouched, and everything mounted under the new /run
# (network namespace pins included) goes away with the last process of the namespace.
# scripts/test.sh runs the real-pods cluster this way, so every CI run starts it from a
# fresh boot's state.
#
#   scripts/fresh-boot.sh CMD...
#
# Requires root (unshare --mount).
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

[ $# -gt 0 ] || { echo "usage: $0 CMD..." >&2; exit 2; }
if [ "${SLUICE_FRESH_BOOT:-}" != inside ]; then
  [ "$(id -u)" = 0 ] || { echo "[fresh-boot] error: needs root (a private mount namespace)" >&2; exit 1; }
  SLUICE_FRESH_BOOT=inside exec unshare --mount --propagation private "$0" "$@"
fi
unset SLUICE_FRESH_BOOT
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# What systemd-tmpfiles puts there at boot and programs expect to find.
install -d -m 1777 /run/lock
install -d -m 0755 /run/user
exec "$@"
