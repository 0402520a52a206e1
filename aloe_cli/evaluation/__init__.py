"""Benchmarks, prompts, answer extraction, the {0, 0.5, 1} judge and the result tables of `aloe eval`."""
