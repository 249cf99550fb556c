"""Benchmarks for inslytic-fast: load generator, scenarios, peers and micro-benchmarks."""
