"""Benchmarks: codec micro-benchmarks, load generators, scenarios and their runner."""
