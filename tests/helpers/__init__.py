"""Helpers shared by test modules (importable as ``helpers``; fixtures live in conftest.py)."""
