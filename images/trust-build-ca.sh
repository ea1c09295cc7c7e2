#!/bin/sh
# Run in the build stage of images/*/Dockerfile: when the build context brought CA certificates
# (images/inputs/ca-certificates/*.crt|*.pem, from `make images EXTRA_CA_CERTS=FILE`), make pip
# trust them besides the base image's own CAs (or, in a base without a CA bundle, pip's bundled
# certifi): one bundle, named in /etc/pip.conf. The build stage is not shipped, so the images
# themselves trust what their base trusts.
#   trust-build-ca.sh CERT_DIR PYTHON
set -eu
dir=$1
python=$2
certs=$(find "$dir" -maxdepth 1 -type f \( -name '*.crt' -o -name '*.pem' \) | sort)
if [ -z "$certs" ]; then
  exit 0
fi
system=$("$python" -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')
if [ ! -s "$system" ]; then
  system=$("$python" -c 'from pip._vendor import certifi; print(certifi.where())')
fi
bundle=/etc/pip-build-ca.pem
# shellcheck disable=SC2086  # one path per line, none with spaces (find above)
cat "$system" $certs >"$bundle"
printf '[global]\ncert = %s\n' "$bundle" >/etc/pip.conf
echo "pip trusts $(echo "$certs" | wc -l) extra CA file(s) in this build: $(echo "$certs" | tr '\n' ' ')"
