"""Offline work: data loading and validation, the synthetic shop, training, evaluation."""
