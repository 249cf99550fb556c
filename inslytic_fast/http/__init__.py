"""HTTP/1.1 on httptools: bytes in, routes, canned responses out. Decides nothing about events."""
