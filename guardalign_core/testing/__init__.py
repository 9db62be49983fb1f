"""Tiny random-weight models for tests, demos and benchmarks (no downloads, meaningless scores)."""
