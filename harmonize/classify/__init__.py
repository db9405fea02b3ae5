"""Downstream classifiers: networks, training and metrics with confidence intervals.
The benchmark that uses them lives in `harmonize.evaluation`."""
