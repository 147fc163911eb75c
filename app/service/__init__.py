"""Service objects: what the HTTP handlers ask for, built on the store (and later the engine)."""
