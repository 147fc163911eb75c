"""OCI references and (later) registry pull and push."""
