"""Where run files live: a local (or NFS) path, or a cloud URI that pyarrow opens (s3://, gs://, ...).

Local files are written atomically (temp file + rename); on cloud storage a file is one object put, which is
atomic by itself. A URI may carry pyarrow's options as a query (`s3://bucket/runs?region=eu-west-1`): `join`
keeps it at the end, so every file under such a directory opens with the same options.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename over the target: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a run file: atomically on local/NFS paths, as one object put on cloud storage (s3://, gs://)."""
    if not is_uri(path):
        atomic_write_bytes(path, data)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    with fs.open_output_stream(inner) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str | Path) -> Optional[str]:
    """A run file's text, or None when it does not exist yet."""
    if not is_uri(path):
        return Path(path).read_text() if Path(path).is_file() else None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def _split_query(path: str) -> tuple[str, str]:
    """(path, "?options") of a URI carrying pyarrow's options; a local path keeps any "?" it has."""
    if is_uri(path) and "?" in path:
        base, query = path.split("?", 1)
        return base, "?" + query
    return path, ""


def join(run_dir: str | Path, name: str) -> str:
    base, query = _split_query(str(run_dir))
    return f"{base.rstrip('/')}/{name}{query}"


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a directory path or URI; a URI's ?options stay on the parent."""
    base, query = _split_query(path)
    parent, name = base.rstrip("/").rsplit("/", 1)
    return parent + query, name


def absolute(path: str) -> str:
    """A URI as given (less a trailing slash), a local path with ~ expanded and made absolute."""
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def exists(path: str | Path) -> bool:
    """Whether a file or directory is there, on a local path or under a URI."""
    if not is_uri(path):
        return Path(path).exists()
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


@contextmanager
def local_dir(path: str | Path) -> Iterator[Path]:
    """A local directory with what `path` holds: the directory itself, or (a URI) a download of it, removed again on
    exit. pyarrow's file systems, as Ray's Checkpoint.as_directory uses them, so this layer needs no Ray."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    with tempfile.TemporaryDirectory(prefix="raytrain-cls-download-") as d:
        pyarrow.fs.copy_files(inner, d, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(d)


def unwritable_reason(directory: str | Path) -> Optional[str]:
    """Why a local directory cannot be created or written to (None when it can; a URI is the store's to judge):
    checked before any work, so a run, an export or a results file never fails at its very end for it."""
    if is_uri(directory):
        return None
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder" if existing == path else f"it would be inside the file {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None
