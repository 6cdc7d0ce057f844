#!/usr/bin/env bash
# sluice's OCI image without a Docker daemon: buildah from scratch, on a root filesystem
# assembled from Debian packages (glibc, libgcc, CA certificates), user 65532, no shell.
# The Dockerfile (distroless cc, the same binary path, user and entrypoint) stays the build for
# users and for CI elsewhere; tests/image.rs checks that the two agree.
#
#   scripts/image.sh build [TAG]   release build + image; prints the docker-archive path
#                                  (TAG defaults to "dev"; the image is ghcr.io/sluice-dev/sluice:TAG)
#   scripts/image.sh rootfs DIR    only assemble the root filesystem (without the binary) in DIR
#
# Reproducible: every file's mtime, the layer's order and owners and the image's created time
# come from the last commit's time (SOURCE_DATE_EPOCH), and the Debian packages are the ones
# listed in scripts/image-packages.txt, downloaded once into the cache.
#
# Cache: ${SLUICE_CACHE:-~/.cache/sluice}/image/{debs,target,sluice-TAG.tar}
set -Eeuo pipefail
shopt -s inherit_errexit
# No silent exit: whatever command fails says where, what and with which status.
trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}/image
REPO=ghcr.io/sluice-dev/sluice

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

epoch() {
  if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then echo "$SOURCE_DATE_EPOCH"; else git -C "$ROOT" log -1 --format=%ct; fi
}

debs() { # -> directory holding the .debs named in image-packages.txt
  local dir=$CACHE/debs pkgs
  mapfile -t pkgs < <(grep -v -e '^#' -e '^$' "$ROOT/scripts/image-packages.txt")
  mkdir -p "$dir"
  local missing=0 p
  for p in "${pkgs[@]}"; do ls "$dir/${p}"_*.deb >/dev/null 2>&1 || missing=1; done
  if [ $missing = 1 ]; then
    log "downloading Debian packages: ${pkgs[*]}"
    if ! (cd "$dir" && apt-get download "${pkgs[@]}" >/dev/null 2>&1); then
      apt-get update -qq
      (cd "$dir" && apt-get download "${pkgs[@]}" >/dev/null)
    fi
  fi
  echo "$dir"
}

cmd_rootfs() { # DIR
  local out=${1:?} dir deb
  dir=$(debs)
  mkdir -p "$out"
  for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$out"; done
  # Nothing that runs: no shell, no package scripts, no docs.
  rm -rf "${out:?}"/usr/share/{doc,man,info,lintian,locale} "${out:?}"/usr/sbin "${out:?}"/usr/bin \
    "${out:?}"/etc/ca-certificates* "${out:?}"/usr/lib/x86_64-linux-gnu/gconv "${out:?}"/usr/libexec \
    "${out:?}"/sbin "${out:?}"/bin
  # What update-ca-certificates would write: the bundle of every Mozilla certificate.
  mkdir -p "$out/etc/ssl/certs"
  find "$out/usr/share/ca-certificates" -name '*.crt' | LC_ALL=C sort | xargs cat >"$out/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$out/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$out/etc/group"
  mkdir -p "$out/tmp" "$out/home/nonroot"
  chmod 1777 "$out/tmp"
}

cmd_build() { # [TAG]
  local tag=${1:-dev} e work c archive
  command -v buildah >/dev/null || die "buildah is required (apt-get install buildah)"
  e=$(epoch)
  log "release build of sluice (target dir in the cache)"
  # Variables cargo sets for the programs it runs (a test calling this script) would make
  # build scripts that read them (ring's) rebuild everything.
  local v
  for v in $(compgen -e | grep '^CARGO_' || true); do
    case $v in CARGO_HOME | CARGO_TARGET_DIR) ;; *) unset "$v" ;; esac
  done
  (cd "$ROOT" && CARGO_TARGET_DIR=$CACHE/target cargo build --release --locked --quiet --bin sluice)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  cmd_rootfs "$work/rootfs"
  install -m 0755 "$CACHE/target/release/sluice" "$work/rootfs/sluice"
  find "$work/rootfs" -exec touch -h -d "@$e" {} +
  tar --sort=name --mtime="@$e" --owner=0 --group=0 --numeric-owner --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$work/rootfs" -cf "$work/layer.tar" .
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$work/layer.tar" / >/dev/null
  buildah config \
    --user 65532:65532 --entrypoint '["/sluice"]' --cmd '' --workingdir / \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label org.opencontainers.image.title=sluice \
    --label "org.opencontainers.image.description=Latency-based load shedding for LLM inference servers on Kubernetes" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --created-by "scripts/image.sh" "$c"
  buildah commit --quiet --rm --timestamp "$e" "$c" "$REPO:$tag" >/dev/null
  archive=$CACHE/sluice-$tag.tar
  rm -f "$archive"
  buildah push --quiet "$REPO:$tag" "docker-archive:$archive:$REPO:$tag" >/dev/null
  log "image $REPO:$tag ($(buildah inspect --format '{{.FromImageID}}' "$REPO:$tag" | cut -c1-12)), archive $archive"
  echo "$archive"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  rootfs) shift; [ $# = 1 ] || die "usage: $0 rootfs DIR"; cmd_rootfs "$1" ;;
  *) die "usage: $0 build [TAG] | rootfs DIR" ;;
esac
