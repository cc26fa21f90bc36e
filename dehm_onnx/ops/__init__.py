"""The HMatMul custom op: its contract (``hmatmul``) and the compiled library (``library``)."""
