#!/bin/sh
# Install a dehm_onnx wheel into a fresh virtual environment and check, with no CMake and
# no C++ compiler on PATH, that custom_op_library() returns the bundled library and that
# it runs (packaging/check_wheel.py).
#
#   sh packaging/check_wheel.sh dist/dehm_onnx-*-linux_x86_64.whl [PYTHON]
#
# The venv goes to a temporary folder (removed at the end); dependencies come from PyPI.
set -eu
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
python=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
cp "$here/check_wheel.py" "$work/"
# PATH holds only the venv: no cmake, no compiler; an empty cache, so nothing built before
# can be found; the working folder is outside any checkout.
cd "$work"
env -i HOME="$work" PATH="$work/venv/bin" DEHM_CACHE="$work/cache" "$work/venv/bin/python" check_wheel.py
