#!/usr/bin/env bash
# Make sure the Python that builds the virtualenv can: Debian ships venv's ensurepip apart,
# in python3.X-venv. Installs it through apt when missing and run as root (CI); otherwise it
# says what to install and fails, since nothing else can work without it.
set -euo pipefail
python="${1:-python3}"
can_venv() { "$python" -c 'import ensurepip, venv' 2>/dev/null; }
can_venv && exit 0
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-python: installing python${version}-venv" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "python${version}-venv" >/dev/null
    can_venv && exit 0
fi
echo "ensure-python: $python cannot make a virtualenv; install python${version}-venv (Python >= 3.11)" >&2
exit 1
