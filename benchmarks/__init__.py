"""Measured performance of fedseg; each module is a command that writes BENCHMARKS.md."""
