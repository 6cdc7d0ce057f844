#!/usr/bin/env bash
# Unpacks Debian's nginx into ~/.cache/sluice/nginx (no service is started) and prints the
# binary's path. Used by `cargo bench --bench gateway` for the nginx reverse-proxy baseline:
#   SLUICE_NGINX=$(scripts/nginx.sh) cargo bench --bench gateway
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
DIR=$CACHE/nginx
if [ ! -x "$DIR/usr/sbin/nginx" ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  (cd "$dl" && apt-get download nginx >&2)
  mkdir -p "$DIR" && dpkg-deb -x "$dl"/nginx_*.deb "$DIR"
fi
"$DIR/usr/sbin/nginx" -v >&2
echo "$DIR/usr/sbin/nginx"
