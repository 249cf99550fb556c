"""Per-project token buckets: in one process, shared by workers, and across a cluster."""
