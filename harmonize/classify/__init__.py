"""Downstream classifiers: networks, training, evaluation with confidence intervals."""
