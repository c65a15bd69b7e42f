"""Command line: `onnxcam explain`, `layers`, `ops`, `export`, `serve`, `evaluate`, `providers` (main.py), and
the syntax of target strings and input files (inputs.py)."""
from .main import cli, main

__all__ = ["cli", "main"]
