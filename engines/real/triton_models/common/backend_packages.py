"""Imported first by every model.py here: puts the packages that engines/real/triton.py's install()
put beside the Python backend (its folder's PACKAGES subfolder) first on sys.path. They are numpy 1.x,
which triton_python_backend_utils imports (Triton 2.51's stub misreads BYTES tensors with numpy 2,
which the interpreter's own site-packages may hold), and tokenizers. The stub's interpreter is
isolated: it ignores PYTHONPATH."""

import importlib.util
import sys
from pathlib import Path

PACKAGES = "kvgate-packages"  # install()'s Installation.python_packages

# The backend's folder is on sys.path (last); finding the module there does not import it.
_backend = Path(importlib.util.find_spec("triton_python_backend_utils").origin).parent
sys.path.insert(0, str(_backend / PACKAGES))
