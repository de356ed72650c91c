"""raytrain_cls.core.storage: atomic local writes, and the same file operations on a cloud URI (a local moto S3)."""

from __future__ import annotations

import os

import pytest

from raytrain_cls.core import storage
from raytrain_cls.core.storage import atomic_write_text, exists, join, read_text, split, write_text


def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["out.txt"]


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.csv"
    path.write_text("old content\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new content\n")
    assert path.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["summary.csv"]  # the temp file was removed


def test_atomic_write_failure_while_writing(tmp_path, monkeypatch):
    """An exception during the write itself (here: text that cannot be encoded) also leaves no trace."""
    path = tmp_path / "f.txt"
    path.write_text("keep")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "bad \udc80 surrogate")
    assert path.read_text() == "keep" and os.listdir(tmp_path) == ["f.txt"]


def test_join_keeps_a_uri_query_at_the_end():
    assert join("s3://b/runs?region=eu-west-1", "exp") == "s3://b/runs/exp?region=eu-west-1"
    assert join(join("s3://b/runs/?region=x", "exp"), "config.yaml") == "s3://b/runs/exp/config.yaml?region=x"
    assert join("/data/runs/", "exp") == "/data/runs/exp"
    assert join("/data/what?not", "exp") == "/data/what?not/exp"  # a local path keeps its "?"


def test_files_under_an_s3_uri_with_options(s3_upload, tmp_path):
    (tmp_path / "run").mkdir()
    run = s3_upload(tmp_path / "run", "unit/storage-run")
    assert not exists(join(run, "config.yaml")) and read_text(join(run, "config.yaml")) is None
    write_text(join(run, "config.yaml"), "model: {model: resnet10t}\n")
    assert exists(join(run, "config.yaml"))
    assert read_text(join(run, "config.yaml")) == "model: {model: resnet10t}\n"


def test_local_read_text_of_a_missing_file_is_none(tmp_path):
    assert read_text(tmp_path / "nope.txt") is None and not exists(tmp_path / "nope.txt")


def test_split_keeps_a_uri_query_on_the_parent():
    assert split("s3://b/runs/exp?region=x") == ("s3://b/runs?region=x", "exp")
    assert split("/data/runs/exp/") == ("/data/runs", "exp")
