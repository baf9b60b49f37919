"""The lab: a cluster of network namespaces on one machine, the real reconciler
on every node, real packets between every pair of endpoints, compared with a
case file's truth tables. `python -m tests.lab demo` shows it at work.

Modules: case (case files), netns (namespaces and setns), cluster (the
network), traffic (servers and probes), apiobjects (what the API serves),
reconcilers (running reconcile.py), lab (one running cluster), runner (cases,
steps, transitions, reports), matrix and demo (for people), __main__ (CLI).
"""
