"""Helpers that tests and benchmarks run as separate processes."""
