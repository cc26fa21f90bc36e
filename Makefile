# The two set-up commands of the README. Each one installs the package with its test
# extras first, so either works on a fresh machine with Python >= 3.10, pip and make.
# `python` if it exists, else `python3` (Debian and Ubuntu ship only the latter).
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)

.PHONY: install demo test edge-check

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) models/make_demo.py models/demo.onnx
	$(PYTHON) -m dehm_onnx optimize models/demo.onnx models/demo.opt.onnx --report models/demo.report.json

test: install
	$(PYTHON) -m pytest -q

# aarch64 under qemu (not part of `test`; several minutes; see README "Edge devices").
edge-check:
	PYTHON=$(PYTHON) sh benchmarks/edge_check.sh
