"""The fault campaign (``python -m bench.faults``): faults injected into real training jobs and into a finished
artifact, each judged against the outcome written for it beforehand.

``catalog`` holds the faults as data (what, where, expected outcome, seed of the random point), ``judge`` the pure
judgement (summary comparison without timings, outcome classification, lost checkpoints), ``harness`` the machinery
(launching jobs, finding ranks, watching phases, mounts, damaging files) and ``__main__`` the command line and the
results (``bench/results/faults.{txt,json}``).
"""
