"""Speed and memory measurements of PETR (driven by tools/benchmark.py)."""
