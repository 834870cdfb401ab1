"""Metrics, per-group fairness reports and their plots, and the one evaluation loop."""
