"""Benchmarks (`make bench`): step time against reference implementations."""
