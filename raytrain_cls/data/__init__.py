"""Data: sources (what the samples are), samplers (who reads which), transforms and loaders (how they arrive)."""
from .loader import Loaders, build_loaders
from .sources import DataError, Source, build_source

__all__ = ["DataError", "Loaders", "Source", "build_loaders", "build_source"]
