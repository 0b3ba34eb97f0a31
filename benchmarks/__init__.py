"""Benchmarks: measured performance, written to BENCHMARKS.md (see README.md here)."""
