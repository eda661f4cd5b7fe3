"""Make the helpers next to these tests (`ops_reference`) importable under any pytest import mode.

With `--import-mode=importlib` pytest no longer puts test directories on `sys.path`.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
