"""model-runner: a Docker Model Runner compatible local model server."""

__version__ = "0.1.0"
