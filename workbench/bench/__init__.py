"""Benchmarks that run the project and its baselines side by side (``workbench bench ...``)."""
