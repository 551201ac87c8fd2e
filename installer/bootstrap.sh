#!/usr/bin/env bash
# Set up Fluidity from a source checkout on Debian/Ubuntu (Python 3.11+):
# the apt packages it needs, a virtualenv in .venv and an editable install.
#
#   bash installer/bootstrap.sh          # to run Fluidity
#   bash installer/bootstrap.sh --test   # also what the test suite needs (curl, openssl, Xvfb, tray host, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
command -v openssl >/dev/null || packages+=(openssl)
if [ "$want_tests" = 1 ]; then
    command -v curl >/dev/null || packages+=(curl)
    command -v objcopy >/dev/null || packages+=(binutils)
    command -v desktop-file-validate >/dev/null || packages+=(desktop-file-utils)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "Installing system packages: ${packages[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_tests" = 1 ]; then
    .venv/bin/python -m pip install -q -e ".[test,installer]"
    bash .ci/install-display-deps.sh
else
    .venv/bin/python -m pip install -q -e .
fi
echo "Fluidity is installed in .venv"
