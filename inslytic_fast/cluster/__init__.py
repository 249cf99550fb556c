"""Cluster mode's coordinator (Redis/Valkey): the shared catalog and limit leases."""
