"""The data-source registry: one catalogue of kinds (core.datasets) that config, prepare, the CLI and bench read, and
one builder per kind (data.registry)."""

import pytest

from raytrain_cls.commands.cli import build_parser
from raytrain_cls.core.config import ConfigError, load_config
from raytrain_cls.core.datasets import ALIASES, HF_PREFIX, KINDS, NAMES, PREPARABLE, canonical_dataset, dataset_kind
from raytrain_cls.data.registry import BUILDERS, build_source


def test_every_kind_has_exactly_one_builder():
    assert set(BUILDERS) == set(NAMES) | {HF_PREFIX}


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_every_alias_names_its_kind(alias, name):
    assert canonical_dataset(alias.upper()) == name and dataset_kind(alias) is dataset_kind(name)


def test_the_catalogue_is_what_config_and_prepare_accept():
    for kind in KINDS:
        if kind.needs_data_dir:
            with pytest.raises(ConfigError, match="needs --data-dir"):
                load_config("digits", {"dataset": kind.name})
        else:
            assert load_config("digits", {"dataset": kind.name}).data.dataset == kind.name
    with pytest.raises(ConfigError, match="unknown data set"):
        load_config("digits", {"dataset": "cifar"})
    prepare = build_parser().parse_args(["prepare", "src", "dst", "--dataset", "Fashion-MNIST"])
    assert prepare.dataset == "fashion_mnist" and set(PREPARABLE) == {"digits", "fashion_mnist", "folder"}


def test_a_built_source_takes_the_configs_pixel_limit():
    cfg = load_config("digits", {"max_image_pixels": 1234})
    source = build_source(cfg)
    assert source.num_classes == 10 and source.train.max_pixels == source.val.max_pixels == 1234
