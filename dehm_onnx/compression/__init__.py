"""Compressing weights, apart from any model format: tasks, results and skip reasons.

Everything here imports numpy, scipy and ``dehm_onnx.hmatrix`` only (never onnx), so the
worker processes of ``parallel`` start light, and the graph layer above uses this package
without it knowing about graphs:

- ``skips``: ``SkipReason`` and ``Skip`` (why a layer stays dense), and ``check_gain``;
- ``weights``: ``WeightSlice`` (a validated slice of an external-data file) and
  ``WeightRecipe`` (a stored tensor plus the dequantize/cast/reshape/transpose steps that
  turn it into the float weight);
- ``parallel``: ``LayerTask``/``LayerResult`` and ``compress_layers`` (``--jobs``).
"""
