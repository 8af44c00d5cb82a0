"""Benchmarks for p2pimg, each figure beside a baseline measured in the same run."""
