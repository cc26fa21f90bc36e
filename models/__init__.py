"""Scripts that generate or fetch the models used by the demo, tests and benchmarks."""
