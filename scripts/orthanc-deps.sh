#!/usr/bin/env bash
# Installs Debian's `orthanc` package when it is missing, and nothing else: what
# `make dev-orthanc` needs. The test suite's packages are scripts/system-deps.sh's.
set -euo pipefail

if command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo to install Debian's orthanc" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing the Debian package: orthanc"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends orthanc >/dev/null
# The package may start a system Orthanc on 8042: scripts/dev_orthanc.py then picks
# another port for its own, and says which.
