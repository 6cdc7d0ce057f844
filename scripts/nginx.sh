#!/usr/bin/env bash
# Unpacks Debian's nginx into ~/.cache/sluice/nginx (no service is started) and prints the
# binary's path. Used by `cargo bench --bench gateway` for the nginx reverse-proxy baseline:
#   SLUICE_NGINX=$(scripts/nginx.sh) cargo bench --bench gateway
set -euo pipefail
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
