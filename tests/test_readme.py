"""The README's Quickstart: its first `onnxcam explain` line runs on the bundled demo and writes the PNG."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_explain_line_writes_the_overlay(tmp_path):
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    install = next(ln for ln in lines if ln.startswith("pip install"))
    explain = next(ln for ln in lines if ln.startswith("onnxcam explain"))
    assert install == "pip install -e '.[cpu]'"
    args = shlex.split(explain)[2:]
    out = Path(args[args.index("-o") + 1])
    # Run from a copy of the layout (models/ is read relative to the clone) with the output in tmp.
    (tmp_path / "models").symlink_to(ROOT / "models")
    result = subprocess.run([sys.executable, "-m", "onnxcam", "explain", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / out).stat().st_size > 10_000
    assert "Egyptian cat" in result.stdout.splitlines()[1]
