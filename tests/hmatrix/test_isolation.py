"""dehm_onnx.hmatrix must work without onnx or onnxruntime."""

import subprocess
import sys

CODE = """
import sys
sys.modules['onnx'] = None          # any 'import onnx' now raises ImportError
sys.modules['onnxruntime'] = None
import numpy as np
from dehm_onnx.hmatrix import compress
hm = compress(np.eye(40), 0.1)
assert 'onnx' not in [m for m in sys.modules if sys.modules[m] is not None]
print(hm.params)
"""


def test_hmatrix_imports_without_onnx():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0
