"""The feature store: Redis key layout, profiles, catalog state, the embedded server."""
