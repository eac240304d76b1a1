"""Trials: one training run of a study, its attempts, per-epoch metrics and result."""
