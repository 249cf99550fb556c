"""inslytic-fast: a self-hosted, high-throughput server for the Inslytic Ingestion API."""

__version__ = "0.1.0"
