"""The formats models travel in: references, OCI manifests and configs, DMR's model tarball.

Pure format code with no I/O policy of its own, so that both the store (which keeps models in
these formats) and the registry client (which moves them) can depend on it without depending
on each other.
"""
