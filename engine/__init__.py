"""The decision engine: pure domain logic over numpy arrays (no Redis, no HTTP)."""
