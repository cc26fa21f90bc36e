"""Verification of optimized models against their originals on calibration data.

``verify(orig, opt)`` runs both models in onnxruntime (CPU) with every compressed layer's
output exposed, and checks each layer's measured relative output error against the bound
recorded in the optimized model's ``dehm.layers`` metadata. It never mutates either model.
"""

import sys
import types

from .calibration import CalibrationSet, generate_calibration, load_calibration, resolve_calibration
from .check import LayerCheck, LayerStats, OutputCheck, VerifyResult, read_layers, verify

__all__ = [
    "CalibrationSet",
    "LayerCheck",
    "LayerStats",
    "OutputCheck",
    "VerifyResult",
    "generate_calibration",
    "load_calibration",
    "read_layers",
    "resolve_calibration",
    "verify",
]


class _CallableModule(types.ModuleType):
    """Lets ``dehm_onnx.verify(orig, opt)`` work once this subpackage is imported.

    Importing ``dehm_onnx.verify.*`` binds the attribute ``dehm_onnx.verify`` to this module,
    shadowing the lazily exported function of the same name; calling the module forwards to it.
    """

    def __call__(self, *args, **kwargs):
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
