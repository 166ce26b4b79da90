"""Benchmarks: ``python -m bench SCENARIO [--json]``; each prints one JSON object last."""
