#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real, when they are missing:
# Orthanc (private Orthanc and remote site in the tests) with its DICOMweb plugin, a
# PostgreSQL server, PHP with curl (the admin API's PHP example is run against a live
# intake), Chromium (the browser upload page is tested in it), and podman (the image).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo to install Debian packages" >&2; exit 1; }
  SUDO="sudo"
fi

missing=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
# Orthanc's own DICOMweb plugin is a real STOW-RS client of the intake in the tests.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v php >/dev/null 2>&1 || missing+=(php-cli)
php -m 2>/dev/null | grep -qx curl || missing+=(php-curl)
# The upload page is tested in Debian's Chromium, driven by Playwright (no browser download).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The image is built and run with podman on runc, on a base debootstrap makes
# (tests/test_image.py, scripts/image-base.sh).
[ -x /usr/bin/podman ] || missing+=(podman)
[ -x /usr/sbin/runc ] || missing+=(runc)
[ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's orthanc package may start a system Orthanc on 8042; the tests use their own.
fi

# The tests reach PostgreSQL on 127.0.0.1:5432 (INTAKE_TEST_POSTGRES_URL overrides).
if [ -z "${INTAKE_TEST_POSTGRES_URL:-}" ] && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  # A server this script had to start checks passwords: give the test role its default one.
  $SUDO runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
fi
pg_isready -h 127.0.0.1 -p 5432 >/dev/null || [ -n "${INTAKE_TEST_POSTGRES_URL:-}" ] || {
  echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
