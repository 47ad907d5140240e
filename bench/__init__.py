"""Benchmarks: training throughput (train_bench) and the endpoint (endpoint_bench)."""
