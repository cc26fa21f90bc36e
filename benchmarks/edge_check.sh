#!/bin/sh
# aarch64 under emulation: cross-build the aarch64 wheel (compiled HMatMul library inside),
# set up an aarch64 Python with aarch64 wheels of numpy and onnxruntime under
# qemu-user-static, and run benchmarks/edge_run.py there on what benchmarks/edge_prepare.py
# wrote on this (x86-64) machine: the HMatMul conformance table through the library, and the
# demo model, the onnx-asr whisper128 preprocessor and the PINN optimized in every --emit mode,
# against the original on the same inputs. Correctness only: timings under qemu mean nothing.
#
#   sh benchmarks/edge_check.sh [WORK]      (or: make edge-check)
#
# WORK (default $DEHM_CACHE/edge-check, DEHM_CACHE defaulting to ~/.cache/dehm_onnx) keeps the
# aarch64 root, the wheels and the outputs, so a second run only rebuilds and reruns.
# Needs: Debian/Ubuntu (apt), root or the packages g++-aarch64-linux-gnu and qemu-user-static
# installed, scikit-build-core, cmake and ninja in PYTHON (the wheel is built without build
# isolation: an isolated cross build would fetch aarch64 build tools), torch for the PINN
# (pip install torch==2.13.0), network access to the Debian mirror and PyPI.
# EDGE_ORT_VERSION picks the aarch64 onnxruntime (default 1.27.0: the newest whose aarch64
# wheel imports under qemu 7.2; 1.28 to 1.32 crash in their CPU probe at import).
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
ort_version=${EDGE_ORT_VERSION:-1.27.0}
cache=${DEHM_CACHE:-$HOME/.cache/dehm_onnx}
work=${1:-$cache/edge-check}
mkdir -p "$work"
work=$(cd "$work" && pwd)
say() { echo "edge-check: $*"; }

# 1. Cross compiler and emulator.
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1; then
  say "installing g++-aarch64-linux-gnu and qemu-user-static with apt-get"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null
fi

# 2. An aarch64 Debian userland with Python 3.11 (no chroot, no binfmt: qemu -L), from a
#    private apt state so nothing is installed system-wide.
root="$work/root"
if [ ! -x "$root/usr/bin/python3.11" ]; then
  say "fetching the arm64 Python 3.11 packages into $root"
  apt="$work/apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  : > "$apt/status"
  opts="-q -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists=$apt/lists \
 -o Dir::Cache=$apt/cache -o Dir::State::status=$apt/status -o Debug::NoLocking=1"
  # shellcheck disable=SC2086
  apt-get $opts update >/dev/null
  (cd "$apt/debs" && rm -f ./*.deb && \
   apt-get $opts download libc6:arm64 python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
     libpython3.11-stdlib:arm64 zlib1g:arm64 libexpat1:arm64 libssl3:arm64 libffi8:arm64 libstdc++6:arm64 \
     libgcc-s1:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 \
     libtinfo6:arm64 libreadline8:arm64 libgomp1:arm64 libgfortran5:arm64 libcrypt1:arm64 libnsl2:arm64 \
     libtirpc3:arm64 libdb5.3:arm64 libgdbm6:arm64 media-types >/dev/null 2>&1)
  mkdir -p "$root"
  for deb in "$apt"/debs/*.deb; do dpkg -x "$deb" "$root"; done
fi
aarch64_python() { qemu-aarch64-static -L "$root" "$root/usr/bin/python3.11" "$@"; }
pip_aarch64() {
  "$python" -m pip install -q --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_28_aarch64 --platform linux_aarch64 "$@"
}

# 3. aarch64 wheels of numpy and onnxruntime (all the aarch64 side imports besides dehm_onnx).
site="$work/site-onnxruntime-$ort_version"
if [ ! -d "$site/onnxruntime" ]; then
  say "installing aarch64 numpy and onnxruntime $ort_version into $site"
  rm -rf "$site.partial"
  pip_aarch64 --target "$site.partial" numpy "onnxruntime==$ort_version"
  mv "$site.partial" "$site"
fi

# 4. The aarch64 wheel of this checkout (library cross-compiled with the toolchain file),
#    installed without dependencies into its own folder.
say "cross-building the aarch64 wheel"
rm -rf "$work/dist" "$work/dehm"
_PYTHON_HOST_PLATFORM=linux-aarch64 "$python" -m pip wheel -q --disable-pip-version-check --no-deps \
  --no-build-isolation -w "$work/dist" "$repo" \
  -C build-dir="$work/build-aarch64" \
  -C cmake.define.CMAKE_TOOLCHAIN_FILE="$repo/custom_ops/cmake/toolchain-aarch64-linux-gnu.cmake"
wheel=$(ls "$work"/dist/dehm_onnx-*-linux_aarch64.whl)
pip_aarch64 --no-deps --target "$work/dehm" "$wheel"
say "built $(basename "$wheel")"

# 5. Models, inputs and host outputs (x86-64), then the check under emulation.
say "preparing models and the conformance table on the host"
"$python" "$repo/benchmarks/edge_prepare.py" "$work/out"
say "running under qemu-aarch64 (onnxruntime $ort_version)"
cd "$work"
PYTHONPATH="$work/dehm:$site" aarch64_python "$repo/benchmarks/edge_run.py" "$work/out"
