"""Bad images: decoded inside the guard, converted from every mode, skipped and counted by the loader, never
loaded with Pillow's LOAD_TRUNCATED_IMAGES; class folders and class maps that cannot work fail by name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from raytrain_cls.core.config import Config
from raytrain_cls.data.loader import build_loaders
from raytrain_cls.data.registry import build_source
from raytrain_cls.data.sources import BadImageError, DataError, decode_image, load_class_map

DATA_CONFIG = {
    "input_size": [3, 16, 16],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def jpeg_bytes(size=(32, 24), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side: int) -> bytes:
    """A tiny file whose header promises side x side pixels (zeros compress to almost nothing)."""
    return png_bytes(Image.new("1", (side, side)))


BAD_FILES = {
    "truncated.jpg": lambda: jpeg_bytes((64, 64))[:300],
    "empty.jpg": lambda: b"",
    "notes.png": lambda: b"this is a text file, not a picture\n",
    "bomb.png": lambda: bomb_png(200),  # 40,000 pixels: above the limit the tests configure (10,000)
}
GOOD_MODES = {
    "grey.png": lambda: png_bytes(Image.new("L", (20, 20), 90)),
    "alpha.png": lambda: png_bytes(Image.new("RGBA", (20, 20), (10, 200, 10, 128))),
    "palette.png": lambda: png_bytes(
        Image.new("RGB", (20, 20), (10, 20, 250)).convert("P", palette=Image.Palette.ADAPTIVE)
    ),
    "cmyk.jpg": lambda: jpeg_bytes((20, 20), (0, 100, 50, 0), mode="CMYK"),
    "rgb.jpg": lambda: jpeg_bytes((20, 20)),
}


def make_tree(root: Path, bad_in_train: bool = True, n_good: int = 8) -> Path:
    for split in ("train", "validation"):
        for cls in ("ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_good):
                (d / f"{i:02d}.png").write_bytes(png_bytes(Image.new("RGB", (20, 20), (40 * i, 9, 9))))
    target = root / ("train" if bad_in_train else "validation") / "ant"
    for name, make in {**BAD_FILES, **GOOD_MODES}.items():
        (target / name).write_bytes(make())
    return root


def folder_cfg(root: Path, **flat) -> Config:
    return (
        Config()
        .update(
            {
                "dataset": "folder",
                "data_dir": str(root),
                "model": "test_resnet",
                "batch_size": 4,
                "workers": 0,
                "max_image_pixels": 10_000,
                **flat,
            }
        )
        .validate()
    )


# ---- decoding ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_bytes_raise_bad_image_error_naming_the_file(name):
    with pytest.raises(BadImageError) as info:
        decode_image(BAD_FILES[name](), f"somewhere/{name}", max_pixels=10_000)
    assert info.value.where == f"somewhere/{name}" and name in str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on to make the truncated file "work"


def test_bad_image_reasons_say_what_happened():
    reasons = {}
    for name, make in BAD_FILES.items():
        try:
            decode_image(make(), name, max_pixels=10_000)
        except BadImageError as e:
            reasons[name] = e.reason
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert reasons["empty.jpg"] == "empty file"
    assert "decompression bomb" in reasons["bomb.png"] and "40,000 pixels" in reasons["bomb.png"]


def test_bomb_refused_before_decompressing(monkeypatch):
    """The pixel limit is checked from the header: load() is never reached for an over-limit image."""
    calls = []
    real_load = Image.Image.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or real_load(self))
    with pytest.raises(BadImageError):
        decode_image(bomb_png(200), "bomb.png", max_pixels=10_000)
    assert calls == []


def test_default_pixel_limit_is_pillows():
    from raytrain_cls.core.config import DEFAULT_MAX_IMAGE_PIXELS

    assert DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == Config().data.max_image_pixels


@pytest.mark.parametrize("name", sorted(GOOD_MODES))
def test_every_mode_is_converted_to_rgb(name):
    img = decode_image(GOOD_MODES[name](), name)
    assert img.mode == "RGB" and img.size == (20, 20)


def test_palette_and_grey_keep_their_colours():
    assert np.asarray(decode_image(GOOD_MODES["grey.png"](), "g"))[0, 0].tolist() == [90, 90, 90]
    assert np.asarray(decode_image(GOOD_MODES["palette.png"](), "p"))[0, 0].tolist() == [10, 20, 250]


# ---- the loader skips and counts -----------------------------------------------------------------------------
def test_training_loader_skips_and_counts_every_bad_file(tmp_path):
    cfg = folder_cfg(make_tree(tmp_path))
    src = build_source(cfg)
    loaders = build_loaders(cfg, src, DATA_CONFIG, rank=0, world_size=1)
    loaders.set_epoch(0)
    shapes = [x.shape for x, _ in loaders.train]
    n_train = 2 * 8 + len(BAD_FILES) + len(GOOD_MODES)
    assert shapes == [(4, 3, 16, 16)] * (n_train // 4)  # full batches only: skipped samples are refilled
    seen_bad = loaders.train.bad
    dealt = (n_train // 4) * 4
    order = list(loaders.train_sampler)[:dealt]
    expected = sorted(n for n in BAD_FILES if any(src.train.describe(i).endswith(n) for i in order))
    assert seen_bad.count == len(expected)
    assert sorted(Path(e.split(" (")[0]).name for e in seen_bad.examples) == expected
    loaders.set_epoch(1)
    assert loaders.train.bad.count == 0  # counted per epoch


def test_validation_loader_drops_bad_files_without_padding(tmp_path):
    cfg = folder_cfg(make_tree(tmp_path, bad_in_train=False))
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, rank=0, world_size=1)
    total = sum(len(y) for _, y in loaders.val)
    assert total == 2 * 8 + len(GOOD_MODES)
    assert loaders.val.bad.count == len(BAD_FILES)


def test_a_training_batch_with_no_readable_sample_is_an_error(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "validation"):
        (root / split / "ant").mkdir(parents=True)
        for i in range(4):
            (root / split / "ant" / f"{i}.jpg").write_bytes(b"")
    cfg = folder_cfg(root)
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, rank=0, world_size=1)
    with pytest.raises(DataError, match="every sample of a training batch was unreadable"):
        next(iter(loaders.train))


def test_bad_samples_are_skipped_in_loader_processes_too(tmp_path):
    cfg = folder_cfg(make_tree(tmp_path, bad_in_train=False), workers=1)
    loaders = build_loaders(cfg, build_source(cfg), DATA_CONFIG, rank=0, world_size=1)
    assert sum(len(y) for _, y in loaders.val) == 2 * 8 + len(GOOD_MODES)
    assert loaders.val.bad.count == len(BAD_FILES)


# ---- class folders and class maps ------------------------------------------------------------------------------
def test_class_map_txt_pins_indices_and_allows_missing_classes(tmp_path):
    root = make_tree(tmp_path / "d", bad_in_train=False)
    for f in (root / "validation" / "bee").iterdir():
        f.unlink()
    (root / "validation" / "bee").rmdir()  # validation without one class: fine once a map pins the classes
    cmap = tmp_path / "classes.txt"
    cmap.write_text("zebra\nbee\nant\n")
    src = build_source(folder_cfg(root, class_map=str(cmap)))
    assert src.classes == ["zebra", "bee", "ant"]
    assert set(src.train.targets.tolist()) == {1, 2} and set(src.val.targets.tolist()) == {2}
    assert all(src.train.describe(i).split("/")[-2] == src.classes[t] for i, t in enumerate(src.train.targets))


def test_class_map_yaml_mapping_and_list(tmp_path):
    (tmp_path / "m.yaml").write_text("{bee: 1, ant: 0}\n")
    (tmp_path / "l.json").write_text('["ant", "bee"]')
    assert load_class_map(str(tmp_path / "m.yaml")) == ["ant", "bee"]
    assert load_class_map(str(tmp_path / "l.json")) == ["ant", "bee"]
    (tmp_path / "gap.yaml").write_text("{bee: 2, ant: 0}\n")
    with pytest.raises(DataError, match="indices must be 0..1"):
        load_class_map(str(tmp_path / "gap.yaml"))
    (tmp_path / "dup.txt").write_text("ant\nbee\nant\n")
    with pytest.raises(DataError, match=r"\['ant'\] appear twice"):
        load_class_map(str(tmp_path / "dup.txt"))


def test_folder_missing_from_class_map_is_named(tmp_path):
    root = make_tree(tmp_path / "d")
    cmap = tmp_path / "classes.txt"
    cmap.write_text("ant\n")
    with pytest.raises(DataError, match=r"class folders \['bee'\] of .*train are not in the class map"):
        build_source(folder_cfg(root, class_map=str(cmap)))


def test_empty_class_folder_named_even_with_a_class_map(tmp_path):
    root = make_tree(tmp_path / "d")
    (root / "train" / "wasp").mkdir()
    cmap = tmp_path / "classes.txt"
    cmap.write_text("ant\nbee\nwasp\n")
    with pytest.raises(DataError, match=r"class 'wasp'"):
        build_source(folder_cfg(root, class_map=str(cmap)))


def test_class_map_is_validated_before_any_work(tmp_path):
    from raytrain_cls.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.class_map"):
        folder_cfg(tmp_path, class_map=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="only ImageFolder trees take a class map"):
        Config().update({"dataset": "digits", "class_map": __file__}).validate()


def test_a_folder_with_a_foreign_manifest_and_no_split_folders_says_both(tmp_path):
    """Neither prepared shards (a manifest.json that is not ours) nor an ImageFolder tree: the error says why not."""
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"not a raytrain-cls shard manifest.*no 'train' split folder either"):
        build_source(Config().update({"dataset": "folder", "data_dir": str(tmp_path)}))


def test_loader_batches_are_float_tensors(tmp_path):
    cfg = folder_cfg(make_tree(tmp_path))
    x, y = next(iter(build_loaders(cfg, build_source(cfg), DATA_CONFIG, 0, 1).train))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
