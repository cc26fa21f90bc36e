import sys

from dehm_onnx.cli import main

sys.exit(main())
