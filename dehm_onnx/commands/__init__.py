"""Subcommands of ``python -m dehm_onnx``; each module has ``register`` and ``run``."""
