"""Benchmarks of kvgate; each is `python -m bench.NAME` run from the repo root (docs/benchmarks.md)."""
