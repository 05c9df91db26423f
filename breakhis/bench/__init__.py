"""Benchmarks: python -m breakhis.bench loader|train (see __main__.py)."""
