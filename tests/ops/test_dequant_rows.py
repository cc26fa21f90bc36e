"""The layout-v2 row dequantizers (``custom_ops/src/cpu/dequant_impl.h``), bit for bit.

The library picks one build at run time (AVX2+F16C where the CPU has it, else portable C++),
so the kernel tests exercise only one of them on a given machine. This compiles
``custom_ops/tests/dequant_rows_test.cc`` once per build this machine can run and checks
every float16 widening, every rounding to float16 and the int8/int4 rows against plain loops
and the compiler's ``_Float16`` conversions.
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from dehm_onnx.ops.library import source_dir

BUILDS = {"generic": []}
if platform.machine() in ("x86_64", "AMD64"):
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    if " avx2" in flags and " f16c" in flags:
        BUILDS["avx2"] = ["-mavx2", "-mf16c"]


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_row_dequantizers_are_exact(build, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert compiler, "no C++ compiler (the HMatMul library needs one too)"
    src = source_dir()
    binary = tmp_path / f"dequant_rows_{build}"
    subprocess.run(
        [compiler, "-std=c++17", "-O2", f"-DDEHM_DEQUANT_NS={build}", *BUILDS[build], "-I", str(src / "src" / "cpu"),
         str(src / "tests" / "dequant_rows_test.cc"), "-o", str(binary)],
        check=True, capture_output=True, text=True,
    )
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "mismatches: 0" in proc.stdout, proc.stdout + proc.stderr
