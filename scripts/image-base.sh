#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for tests/test_image.py on a machine that
# builds and runs images with podman but cannot pull base images. Prints its name.
#
# The stand-in is Debian bookworm (`debootstrap --variant=minbase`, from this machine's own
# Debian mirror) with Debian's python3 and python3-venv, `python` linked to python3, and
# this machine's CA bundle, so that pip inside the build verifies the package index this
# machine trusts. It never becomes part of the project's image: the Dockerfile keeps
# `FROM python:3.11-slim-bookworm`, and the test substitutes the stand-in for that name in
# its own build only (`podman build --build-context python:3.11-slim-bookworm=…`).
#
# Idempotent and cached. The root filesystem is built once per key (this script, the CA
# bundle and the mirror, hashed) and kept as a tar in $ORTHANC_INTAKE_CACHE
# (/var/cache/orthanc-intake); it is imported into podman's storage only when the image
# `localhost/orthanc-intake-base:<key>` is missing there. podman's settings for this
# machine go in a drop-in, rewritten only when its content differs.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo: debootstrap and podman run as root" >&2; exit 1; }
  exec sudo -- bash "$0" "$@"
fi

CACHE=${ORTHANC_INTAKE_CACHE:-/var/cache/orthanc-intake}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
SUITE=bookworm
# The machine's containers.conf, as a drop-in read after /etc/containers/containers.conf:
# no default ulimits (the machine's hard limits are below podman's defaults; containers get
# theirs with --ulimit), cgroupfs and a file event log (no systemd here).
DROP_IN=/etc/containers/containers.conf.d/50-orthanc-intake.conf
DROP_IN_TEXT='# Written by orthanc-intake scripts/image-base.sh (tests/test_image.py).
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"'

if [ "$(cat "$DROP_IN" 2>/dev/null)" != "$DROP_IN_TEXT" ]; then
  mkdir -p "$(dirname "$DROP_IN")"
  printf '%s\n' "$DROP_IN_TEXT" > "$DROP_IN.tmp"
  mv "$DROP_IN.tmp" "$DROP_IN"
fi

# The bookworm mirror of this machine's apt sources (sources.list or deb822 .sources).
mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE)' | awk -v s="$SUITE" '$2 == s { print $1; exit }')
[ -n "$mirror" ] || { echo "no $SUITE mirror in the apt sources (apt-get indextargets)" >&2; exit 1; }

key=$( { cat "$0" "$CA_BUNDLE"; echo "$mirror"; } | sha256sum | cut -c1-16)
image=localhost/orthanc-intake-base:$key
tarball=$CACHE/base-$key.tar

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock 9  # one build at a time; a second caller finds the first one's result

if [ ! -s "$tarball" ]; then
  work=$(mktemp -d "$CACHE/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "image-base: debootstrap $SUITE from $mirror (once per key $key)" >&2
  if ! debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$work/root" \
      "$mirror" > "$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
  fi
  ln -sf python3 "$work/root/usr/bin/python"
  install -m 0644 "$CA_BUNDLE" "$work/root/etc/ssl/certs/ca-certificates.crt"
  chroot "$work/root" apt-get clean
  rm -rf "$work/root/var/lib/apt/lists/"*
  tar --numeric-owner -C "$work/root" -cf "$work/base.tar" .
  mv "$work/base.tar" "$tarball"
  find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$key.tar" -delete  # older keys
fi

if ! podman image exists "$image"; then
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.title=orthanc-intake-test-base' \
    --change 'CMD ["python3"]' \
    "$tarball" "$image" > /dev/null
  # Older keys' names go (their layers stay while an image built on them exists).
  podman images --format '{{.Repository}}:{{.Tag}}' --filter reference=localhost/orthanc-intake-base \
    | { grep -vxF "$image" || true; } | xargs -r podman untag
fi
echo "$image"
