"""Filter families, one module each. Each module exposes ``SPEC`` (a FilterSpec)."""
