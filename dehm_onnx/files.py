"""Every file the tool writes, and the check that no output clobbers an input or another output.

Writing (``StagedFile``, ``atomic_output``, ``write_text``): a file is written under a
temporary name in its destination's folder, flushed and ``fsync``-ed, then renamed over the
destination, so a reader sees the old file or the whole new one and a failure (an exception,
``MemoryError``, Ctrl-C) leaves nothing behind. The temporary file is created with mode
``0o666`` and the process umask applies, as for any other tool's output (``tempfile.mkstemp``
would make it ``0o600``); the rename gives a replaced file that same mode.

Checking (``check_paths``): before any work, every path a command will write must be a
file name in an existing folder, must not be a folder itself, and must name a different file
than every path the command reads and every other path it writes. Paths are compared after
resolving symlinks and ``.``/``..``, and with ``os.path.samefile`` (hard links) where both
exist. A failure raises ``ConfigError`` naming both paths as the user gave them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

__all__ = ["PathRole", "StagedFile", "atomic_output", "write_text", "write_bytes", "check_paths", "same_path"]

# Room for ".<name>.<8 hex>.tmp" within the usual 255-byte limit of a file name.
_MAX_STEM = 200


class StagedFile:
    """A new file's content, written beside ``path`` and published by ``commit``.

    Use ``atomic_output`` for one file. Two files that belong together (a model and its data
    file) are both ``finish``-ed before either is committed, so that a full disk leaves
    neither; then they are committed in a chosen order (the data file first).

    Attributes:
        path: the destination.
        file: the open binary file to write to.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._given = os.fspath(path)  # as spelled, for messages
        self._tmp, fd = _create_temporary(self.path, self._given)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def finish(self) -> None:
        """Flush, ``fsync`` and close the content (where a full disk shows), without publishing."""
        if self._tmp is None:
            raise AssertionError("Bug: StagedFile finished after commit or discard")
        if self.file.closed:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            raise _naming(e, self._given) from e

    def commit(self) -> None:
        """``finish``, then rename the content over the destination."""
        self.finish()
        try:
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise _naming(e, self._given) from e
        self._tmp = None
        _fsync_folder(self.path.parent)

    def discard(self) -> None:
        """Remove the temporary file (nothing happens after ``commit``)."""
        if self._tmp is None:
            return
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
        self._tmp = None


def _create_temporary(path: Path, given: str) -> tuple[Path, int]:
    folder = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{path.name[:_MAX_STEM]}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 and the kernel applies the umask: the mode any new file of the user gets.
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise _naming(e, given) from e
    raise _naming(FileExistsError(17, "no free temporary name beside it"), given)


def _naming(error: OSError, path: str) -> OSError:
    """The same kind of error (and errno), naming the user's path instead of a temporary file."""
    named = type(error)(f"cannot write {path!r}: {error.strerror or error}")
    named.errno = error.errno
    return named


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``path`` when the block ends without error.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; the message
            names ``path``, and nothing is left behind.
    """
    staged = StagedFile(path)
    try:
        yield staged.file
        staged.commit()
    finally:
        staged.discard()


def write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Write ``data`` to ``path`` atomically (see ``atomic_output``); returns its length."""
    with atomic_output(path) as f:
        f.write(data)
    return len(data)


def write_text(path: str | os.PathLike, text: str) -> int:
    """Write ``text`` to ``path`` as UTF-8, atomically; returns the bytes written."""
    return write_bytes(path, text.encode("utf-8"))


class PathRole:
    """A path a command reads or writes, with the name the user knows it by (``"OUT"``)."""

    __slots__ = ("role", "path", "given")

    def __init__(self, role: str, path: str | os.PathLike):
        self.role = role
        self.path = Path(path)
        self.given = os.fspath(path)  # as spelled, for messages (Path drops "./")

    def describe(self) -> str:
        """``OUT 'o.onnx'``: the role and the path as the user gave it."""
        return f"{self.role} {self.given!r}"


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file, existing or not.

    Existing files are compared by device and inode (``os.path.samefile``: hard links and
    symlinks included); otherwise the absolute paths with symlinks and ``..`` resolved.
    """
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _resolved(a) == _resolved(b)


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the spelled path
        return Path(os.path.abspath(path))


def _check_writable_place(item: PathRole) -> None:
    path = item.path
    if path.is_dir():
        raise ConfigError(f"{item.describe()} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"folder {str(folder)!r} of {item.describe()} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"folder {str(folder)!r} of {item.describe()} is not writable")


def check_paths(reads: Iterable[PathRole], writes: Iterable[PathRole]) -> None:
    """Refuse, before any work, outputs that would clobber an input or each other.

    Args:
        reads: every file the command reads (models, their data files, calibration files).
        writes: every file the command may write.

    Raises:
        ConfigError: a written path is a folder, lies in a missing or read-only folder,
            or names the same file as a read path or another written path (one line
            naming both).
    """
    reads, writes = list(reads), list(writes)
    for item in writes:
        _check_writable_place(item)
    for index, item in enumerate(writes):
        for source in reads:
            if same_path(item.path, source.path):
                raise ConfigError(
                    f"{item.describe()} is the same file as {source.describe()}, which it would overwrite; "
                    "choose another path"
                )
        for other in writes[:index]:
            if same_path(item.path, other.path):
                raise ConfigError(f"{item.describe()} is the same file as {other.describe()}; choose another path")
