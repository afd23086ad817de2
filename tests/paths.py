"""Paths the tests share (tests/ is on sys.path through conftest.py)."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SRC = REPO / "src"
FIXTURES = TESTS / "fixtures"
