#!/usr/bin/env bash
# Make sure the real servers and tools the test suite starts for itself are installed:
# redis-server, PostgreSQL (initdb/pg_ctl/postgres), node with npm (the Node SDK
# check, tests/test_node_sdk.py) and openssl (a certificate for the provider client's
# TLS test, tests/test_provider_client.py). Installs only what is missing,
# through apt, non-interactively; needs root for that (CI runs as root on Debian).
# Without root and with something missing it says what to install and exits 0: the
# tests that need the server then skip locally (and fail under CI=true).
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-services: missing ${need[*]}; install them (e.g. apt-get install ${need[*]})" >&2
    echo "ensure-services: tests that need them will skip (and fail when CI=true)" >&2
    exit 0
fi
echo "ensure-services: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# The packages' own services are not wanted: the tests start private instances.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
