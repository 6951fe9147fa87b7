"""What a TLC dataset looks like: canonical schema, column aliases and quality rules."""
