#!/usr/bin/env bash
# Set up a development environment for vchan on Debian 12 (idempotent).
#
#   scripts/setup.sh            Debian packages for building and testing,
#                               a virtualenv in .venv (or $VCHAN_VENV) with
#                               vchan installed editable plus its test tools.
#   scripts/setup.sh --runtime  only what running vchan needs (quick start).
#   scripts/setup.sh --xen      all of the first, and the Xen rig's host packages
#   (or VCHAN_SETUP_XEN=1)      (QEMU, debootstrap; tests/xen/rig.py, scripts/test --xen).
#
# Debian packages are installed with apt-get when missing (as root, or
# through sudo); without either, the missing ones are listed and we stop.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VCHAN_VENV:-$here/.venv}
python=${PYTHON:-python3}
mode=${1:-full}
case "$mode" in
    full|--runtime) ;;
    --xen) mode=full; VCHAN_SETUP_XEN=1 ;;
    *) echo "usage: scripts/setup.sh [--runtime | --xen]" >&2; exit 2 ;;
esac

# What building vchan needs, and what the test suite adds.
runtime_pkgs=(gcc libc6-dev)
# xen-utils-4.17 and libxenmisc4.17: Debian's vchan-socket-proxy and libxenvchan,
# run unmodified on the emulator by tests/test_compat.py.  redis-server and
# redis-tools: examples/redis_over_vchan.sh, run by tests/test_examples.py.
test_pkgs=(clang libclang-rt-14-dev libxen-dev linux-libc-dev make xenstore-utils
           xen-utils-4.17 libxenmisc4.17 redis-server redis-tools)

# The Xen rig (tests/xen/rig.py): QEMU boots Xen, debootstrap builds its image.
xen_pkgs=(qemu-system-x86 debootstrap e2fsprogs)

missing=()
want=("${runtime_pkgs[@]}")
[ "$mode" = "--runtime" ] || want+=("${test_pkgs[@]}")
[ -z "${VCHAN_SETUP_XEN:-}" ] || want+=("${xen_pkgs[@]}")
if command -v dpkg-query >/dev/null; then
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
fi
# The Python we build with needs its headers and venv support.
if ! "$python" -c 'import ensurepip' 2>/dev/null; then missing+=(python3-venv); fi
if [ ! -e "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    missing+=(python3-dev)
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
        echo "vchan setup: please install these Debian packages: ${missing[*]}" >&2
        exit 1
    fi
    echo "vchan setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "vchan setup: creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip
if [ "$mode" = "--runtime" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here"
else
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here[dev]"
fi
