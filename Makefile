# The two set-up commands of the README. Each one installs the package with its test
# extras first, so either works on a fresh machine with Python >= 3.10, pip and make.
PYTHON ?= python

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -e ".[test]"

demo: install
	$(PYTHON) models/make_demo.py models/demo.onnx
	$(PYTHON) -m dehm_onnx optimize models/demo.onnx models/demo.opt.onnx --report models/demo.report.json

test: install
	$(PYTHON) -m pytest -q
