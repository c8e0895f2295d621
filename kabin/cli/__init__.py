"""The click layer: one module per command; it parses, reads stdin, writes stdout."""
