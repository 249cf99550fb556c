"""What a request's body becomes: key check, decode and validation, Segment mapping, dedup."""
