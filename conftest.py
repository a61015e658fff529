"""Repository-wide pytest set-up: makes benchmarks/ importable (the docs example's writer)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
