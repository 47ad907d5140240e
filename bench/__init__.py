"""Benchmarks (python -m bench.train_bench)."""
