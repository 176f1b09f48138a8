"""Benchmarks for visiona_tunnel (run them as scripts; they are not tests)."""
