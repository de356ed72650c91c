"""timm's `--dataset hfds/NAME` with --input-key/--target-key: Hugging Face data sets read from disk (saved with
save_to_disk, or a folder of Parquet files), offline unless --dataset-download; sklearn's digits as the data."""

import numpy as np
import pytest

from raytrain_cls.core.config import Config, ConfigError, load_config
from raytrain_cls.data import DataError, build_source
from raytrain_cls.data.sources import BadImageError, read_digits

datasets = pytest.importorskip("datasets")

CLASSES = [f"digit_{i}" for i in range(10)]


def digits_dict(n_train=60, n_val=20, image_key="image", target_key="label", class_label=True):
    from PIL import Image

    images, labels = read_digits()
    pil = [Image.fromarray((img * 15).astype(np.uint8), mode="L") for img in images[: n_train + n_val]]
    target = datasets.ClassLabel(names=CLASSES) if class_label else datasets.Value("string")
    values = labels[: n_train + n_val].tolist() if class_label else [CLASSES[v] for v in labels[: n_train + n_val]]
    features = datasets.Features({image_key: datasets.Image(), target_key: target})

    def split(a, b):
        return datasets.Dataset.from_dict({image_key: pil[a:b], target_key: values[a:b]}, features=features)

    return datasets.DatasetDict(train=split(0, n_train), test=split(n_train, n_train + n_val)), labels


def hf_config(name, **extra) -> Config:
    cfg = Config()
    cfg.update({"dataset": f"hfds/{name}", **extra})
    return cfg.validate()


def test_a_saved_data_set_is_a_source_with_its_class_names(tmp_path):
    ds, labels = digits_dict()
    ds.save_to_disk(str(tmp_path / "saved"))
    source = build_source(hf_config(tmp_path / "saved"))
    assert source.classes == CLASSES and len(source.train) == 60 and len(source.val) == 20  # 'test' = validation
    img, target = source.val[3]
    assert target == labels[63] and img.size == (8, 8) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img)[..., 0], (read_digits()[0][63] * 15).astype(np.uint8))
    data, target = source.train.encoded(0)
    assert data[:4] == b"\x89PNG" and target == labels[0]  # still encoded: --gpu-decode can take it


def test_a_parquet_folder_with_other_column_names_and_string_labels(tmp_path):
    ds, labels = digits_dict(image_key="png", target_key="digit", class_label=False)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds["train"].to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    ds["test"].to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="no column 'image'.*--input-key"):
        build_source(hf_config(tmp_path / "pq", data_dir=str(tmp_path / "cache")))
    source = build_source(
        hf_config(tmp_path / "pq", input_key="png", target_key="digit", data_dir=str(tmp_path / "cache"))
    )
    assert source.classes == sorted({CLASSES[v] for v in labels[:60]})
    assert [source.classes[source.val[i][1]] for i in range(5)] == [CLASSES[v] for v in labels[60:65]]


def test_validation_labels_outside_the_training_classes_fail(tmp_path):
    ds, _ = digits_dict(class_label=False)
    ds["test"] = ds["test"].map(lambda row: {"label": "ten"})
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="'ten'.*not among the training classes"):
        build_source(hf_config(tmp_path / "saved"))


def test_a_hub_name_is_not_downloaded_without_dataset_download(tmp_path):
    with pytest.raises(DataError, match="--dataset-download"):
        build_source(hf_config("someone/not-cached-here", data_dir=str(tmp_path)))


def test_a_corrupt_image_row_is_a_bad_sample_not_a_crash(tmp_path):
    ds, _ = digits_dict()
    train = ds["train"].cast_column("image", datasets.Image(decode=False))
    rows = train.to_dict()
    rows["image"][5] = {"bytes": b"\x89PNG not really", "path": None}
    ds["train"] = datasets.Dataset.from_dict(rows, features=train.features).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    source = build_source(hf_config(tmp_path / "saved"))
    with pytest.raises(BadImageError, match=r"\[5\]"):
        source.train[5]
    assert source.train[6][0].size == (8, 8)


@pytest.mark.parametrize(
    "extra,key",
    [
        (dict(dataset="digits", input_key="img"), "data.input_key"),
        (dict(dataset="hfids/beans"), "data.dataset"),
        (dict(dataset="hfds/x", dataset_trust_remote_code=True), "data.dataset_trust_remote_code"),
    ],
)
def test_config_refusals(extra, key):
    cfg = Config()
    cfg.update(extra)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.key == key


def test_timms_iterable_sizes_are_accepted_and_ignored_with_a_note(tmp_path, capsys):
    (tmp_path / "args.yaml").write_text(
        "dataset: hfds/x\ninput_key: img\ntrain_num_samples: 1000\nval_num_samples: null\ndataset_download: true\n"
    )
    cfg = load_config(str(tmp_path / "args.yaml"))
    assert cfg.data.input_key == "img" and cfg.data.dataset_download
    err = capsys.readouterr().err
    assert "ignoring timm key 'train_num_samples'" in err and "val_num_samples" not in err
