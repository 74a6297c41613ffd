"""The edge: CLI, settings and the FastAPI app."""
