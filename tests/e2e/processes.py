"""Process ids on this host whose command line mentions a marker: how the end-to-end tests find every process of a
cluster they started (its state or temp directory is in each one's command line) without touching anyone else's."""

from __future__ import annotations

from pathlib import Path


def pids_mentioning(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
    return pids
