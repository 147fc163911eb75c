"""Moving models to and from OCI registries: auth, the registry client, pull and push."""
