"""Build Docker model artifacts (OCI manifest + config + layers) from local GGUF files."""
