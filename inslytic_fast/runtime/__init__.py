"""Processes: the server's assembly, the supervisor and its workers, files and signals."""
