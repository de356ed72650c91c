"""Data: sources (what the samples are), samplers (who reads which), transforms and loaders (how they arrive).

The loader side (torch, timm) is imported on first use, so `raytrain-cls prepare` and the sources start fast.
"""

from raytrain_cls.data.registry import build_source
from raytrain_cls.data.sources import DataError, Source

__all__ = ["DataError", "Loaders", "Source", "build_loaders", "build_source"]


def __getattr__(name: str):
    if name in ("Loaders", "build_loaders"):
        from raytrain_cls.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
