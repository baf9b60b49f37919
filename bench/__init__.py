"""Benchmark of the reconciler at cluster scale: synthetic clusters served by a
real HTTP API server, the real pipeline writing a real kernel inside network
namespaces of its own. Run it with `python -m bench`."""
