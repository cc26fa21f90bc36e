"""Runs HMatMul on many (possibly malformed) input sets in one onnxruntime session.

Usage: python _fuzz_worker.py LIBRARY CASES.pkl RESULTS.pkl [LAYOUT_VERSION]
A crash (segfault) here shows up as the parent test's non-zero return code.
"""

import pickle
import sys

import numpy as np
import onnxruntime as ort

from dehm_onnx.hmatrix import PackedHMatrix
from dehm_onnx.ops.hmatmul import make_hmatmul_model


def main(library, cases_path, results_path, version="1"):
    with open(cases_path, "rb") as f:
        cases = pickle.load(f)
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    data, columns = (np.zeros(1, np.float32), 7) if version == "1" else (np.zeros(1, np.uint8), 10)
    dummy = PackedHMatrix(data, np.zeros((1, columns), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), (1, 1))
    model = make_hmatmul_model(dummy, packed_as_inputs=True)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = []
    for x, data, layout, row_perm, col_perm in cases:
        feeds = {"X": x, "w.data": data, "w.layout": layout, "w.row_perm": row_perm, "w.col_perm": col_perm}
        try:
            results.append((True, "", session.run(None, feeds)[0]))
        except Exception as e:  # noqa: BLE001 - every onnxruntime failure is a result here
            results.append((False, str(e), None))
    with open(results_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
