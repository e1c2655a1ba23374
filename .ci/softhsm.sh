#!/usr/bin/env bash
# SoftHSM2 (PKCS#11 module + softhsm2-util) for tests/pkcs11.rs: the master key in a token.
# The tests make their own token directories; this only installs the package if missing.
set -euo pipefail
if [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq softhsm2 >/dev/null
test -e /usr/lib/softhsm/libsofthsm2.so
