"""Shared pytest setup. Keep this small and generic; fixtures specific to one test file live in that file."""
from __future__ import annotations

import sys
from pathlib import Path

# `from tests.adjoint import ...` / `from tests.torch_export import ...` must work under a plain `pytest`
# (not only `python -m pytest`, which puts the working directory on sys.path).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
