"""Experiments that the command line runs: reproducing the paper's tables (and, later, sweeps)."""
