"""Benchmarks (`modalmerge bench …`): separate from the tests, each with a quick mode CI runs."""
