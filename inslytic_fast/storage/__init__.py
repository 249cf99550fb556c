"""The roll from the log into Parquet, the on-disk layout, queries and purges over it."""
