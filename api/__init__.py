"""The HTTP service: FastAPI app, routes, settings, metrics, and the nextbest command line."""
