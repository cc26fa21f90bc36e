"""A one-line progress bar on stderr: layers done and the running compression ratio.

Used by the command line only (the library never prints). It draws nothing when the
stream is not a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """Call ``start(total)``, then ``layer(name, params, dense_params)`` per finished layer, then ``close()``.

    ``params`` is what the layer stores after compression (``dense_params`` for a layer left
    dense); the ratio shown is the sum of ``params`` over the sum of ``dense_params`` so far.
    """

    WIDTH = 24

    def __init__(self, stream=None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = self.done = self.params = self.dense = 0
        self.started = time.perf_counter()
        self._drawn = False

    def start(self, total: int) -> None:
        """Begin a run over ``total`` layers."""
        self.total, self.done, self.params, self.dense = total, 0, 0, 0
        self.started = time.perf_counter()
        self._draw("")

    def layer(self, name: str, params: int, dense_params: int) -> None:
        """Record one finished layer and redraw."""
        self.done += 1
        self.params += params
        self.dense += dense_params
        self._draw(name)

    def close(self) -> None:
        """End the line (if anything was drawn)."""
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def line(self, name: str) -> str:
        """The text of the bar for the current state."""
        total = max(self.total, 1)
        filled = round(self.WIDTH * self.done / total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        ratio = f"{self.params / self.dense:.3f}" if self.dense else "-"
        elapsed = time.perf_counter() - self.started
        short = name if len(name) <= 32 else "..." + name[-29:]
        return f"[{bar}] {self.done}/{self.total} layers, ratio {ratio}, {elapsed:.0f}s {short}"

    def _draw(self, name: str) -> None:
        if not self.enabled or not self.total:
            return
        self.stream.write("\r\x1b[2K" + self.line(name))
        self.stream.flush()
        self._drawn = True
