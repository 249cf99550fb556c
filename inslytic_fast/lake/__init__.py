"""Cluster mode's lake: uploading rolled Parquet to object storage, and its leader jobs."""
