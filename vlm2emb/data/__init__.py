"""Data: the canonical schema, sources, media decoding, collation and the demo set."""
