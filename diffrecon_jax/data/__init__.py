"""Datasets, coarse-graining, sparse patterns and the task pipeline."""
