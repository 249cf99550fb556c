"""The group-commit log: the durable record a 202 stands on, and its readers' format."""
