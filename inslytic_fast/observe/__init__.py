"""Metrics, logs and the health probe."""
