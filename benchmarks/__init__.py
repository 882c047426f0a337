"""Throughput benchmarks (training step, attention kernels, data loading) printing side-by-side ratios."""
