"""Peer comparisons that print ratios. Run each as a module from the repository root:
`python -m benchmarks.serving`, `python -m benchmarks.throughput`, ... (BENCHMARKS.md)."""
