"""The local model store, in Docker Model Runner's on-disk layout."""

from app.store.store import IndexEntry, ModelNotFound, ModelStore, MultipleTags, StoreError

__all__ = ["IndexEntry", "ModelNotFound", "ModelStore", "MultipleTags", "StoreError"]
