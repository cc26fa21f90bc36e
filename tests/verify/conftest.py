import sys
from pathlib import Path

# The hand-made model builders live next to the tests (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent))
