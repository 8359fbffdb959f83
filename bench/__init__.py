"""Benchmarks of the dataserver against in-process and one-copy baselines: ``python -m bench``."""
