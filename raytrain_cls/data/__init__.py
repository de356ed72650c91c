"""Data: sources (what the samples are), samplers (who reads which), transforms and loaders (how they arrive).

The loader side (torch, timm) is imported on first use, so `raytrain-cls prepare` and the sources start fast.
"""
from .sources import DataError, Source, build_source

__all__ = ["DataError", "Loaders", "Source", "build_loaders", "build_source"]


def __getattr__(name: str):
    if name in ("Loaders", "build_loaders"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
