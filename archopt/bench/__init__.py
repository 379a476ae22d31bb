"""Benchmarks that the CLI can run (``archopt bench ...``); scripts in ``benchmarks/`` wrap them."""
