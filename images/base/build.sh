#!/usr/bin/env bash
# `make base-image`: a Python 3.11 base image from Debian packages alone, for sites (and CI) where
# no base image can be pulled from a registry but a Debian mirror can be reached. mmdebstrap builds
# a bookworm minbase root filesystem with python3, python3-venv, python-is-python3,
# ca-certificates and passwd (useradd, for the worker image); `docker import` turns it into an
# image. Then: make images PYTHON_IMAGE=finetune-base:dev
#
# Environment (the Makefile passes its variables of the same names):
#   BASE_IMAGE=finetune-base:dev                    the tag to create
#   DEBIAN_SUITE=bookworm                           bookworm's python3 is 3.11, as the images expect
#   DEBIAN_MIRROR=http://deb.debian.org/debian      a mirror (or snapshot.debian.org/archive/debian/<date>)
#   DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security   empty: no security suite
#   BASE_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
#       PEM certificates to trust besides Debian's own: those of them that Debian's ca-certificates
#       does not already carry (a site's TLS-inspecting proxy, a private index) are added with
#       update-ca-certificates, so pip in the image builds (and in the images) trusts them.
#       Empty: Debian's certificates only.
#   SOURCE_DATE_EPOCH   timestamps of the files (default: the last commit's time), so two runs
#                       against the same mirror content give the same image layer
#   DOCKER=docker       the Docker CLI
# Needs root (mmdebstrap's root mode creates device nodes and chowns files) and mmdebstrap.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE_IMAGE=${BASE_IMAGE:-finetune-base:dev}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR-http://deb.debian.org/debian-security}
CA_CERTS=${BASE_CA_CERTS-/etc/ssl/certs/ca-certificates.crt}
DOCKER=${DOCKER:-docker}
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd

command -v mmdebstrap >/dev/null || { echo "mmdebstrap not found: apt-get install mmdebstrap" >&2; exit 2; }
[[ -z $CA_CERTS || -r $CA_CERTS ]] || { echo "BASE_CA_CERTS=$CA_CERTS is not a readable file (BASE_CA_CERTS= for Debian's CAs only)" >&2; exit 2; }
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

work=$(mktemp -d "${TMPDIR:-/tmp}/finetune-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
sources=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
[[ -z $SECURITY_MIRROR ]] || sources+=("deb $SECURITY_MIRROR $SUITE-security main")
# In the hooks, "$1" (single-quoted) is the root filesystem: mmdebstrap's sh expands it.
# shellcheck disable=SC2016
hooks=(
  # No host identity in the image (and the same bytes on every host): the runtime provides both.
  --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"'
)
if [[ -n $CA_CERTS ]]; then
  cp "$CA_CERTS" "$work/site-ca.pem"
  # Only the certificates Debian's bundle lacks, one file each (update-ca-certificates links the
  # first certificate of a file), so the image's bundle holds each certificate once.
  # shellcheck disable=SC2016
  hooks+=(--customize-hook="python3 \"$PWD/images/base/extra_certs.py\" \"$work/site-ca.pem\" \"\$1/etc/ssl/certs/ca-certificates.crt\" \"\$1/usr/local/share/ca-certificates\""
          --customize-hook='chroot "$1" update-ca-certificates')
fi

echo "base image $BASE_IMAGE: mmdebstrap $SUITE minbase from $MIRROR (+ $PACKAGES)"
# merged /usr as Debian's own images have it, set up by mmdebstrap's hook (without it apt picks
# the usrmerge package, which pulls in perl: 50 MB).
mmdebstrap --variant=minbase --include="$PACKAGES" --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  "${hooks[@]}" "$SUITE" "$work/rootfs.tar" "${sources[@]}"

"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --change "LABEL org.opencontainers.image.title=finetune-base org.opencontainers.image.description=\"Debian $SUITE minbase with python3 (mmdebstrap)\" org.opencontainers.image.source=\"$MIRROR\"" \
  "$work/rootfs.tar" "$BASE_IMAGE" >/dev/null
"$DOCKER" run --rm "$BASE_IMAGE" python3 -c 'import sys, venv, ssl; print("python", sys.version.split()[0])'
echo "built $BASE_IMAGE ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
