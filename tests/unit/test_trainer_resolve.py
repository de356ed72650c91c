"""Driver-side decisions made before any Ray work: scaling, run directory, data config, failure messages."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raytrain_cls.core.config import Config, ConfigError, load_config
from raytrain_cls.core.state import FORMAT_VERSION, META_FILE, MODEL_FILE, STATE_FILE, CheckpointError, file_digest
from raytrain_cls.run.checkpointer import (
    RAY_SNAPSHOT,
    find_resume_target,
    init_checkpoint,
    remove_unregistered_checkpoints,
    run_config_file,
)
from raytrain_cls.run.driver import explain_failure, resolve, resolve_scaling, run_paths
from raytrain_cls.run.preflight import resolve_data_config


def _cfg(**overrides) -> Config:
    return load_config("digits", overrides)


def test_cpu_cluster_defaults_to_one_worker_with_every_cpu():
    assert resolve_scaling(_cfg(), {"CPU": 2.0}) == (False, 1, {"CPU": 2})
    assert resolve_scaling(_cfg(num_workers=2), {"CPU": 2.0}) == (False, 2, {})  # the DDP demonstration


def test_gpu_cluster_defaults_to_one_worker_per_gpu():
    assert resolve_scaling(_cfg(), {"CPU": 16.0, "GPU": 4.0}) == (True, 4, {})


def test_no_use_gpu_on_a_gpu_cluster_trains_on_cpus():
    assert resolve_scaling(_cfg(use_gpu=False, num_workers=3), {"CPU": 16.0, "GPU": 4.0}) == (False, 3, {})


@pytest.mark.parametrize(
    "overrides, cluster, key, reason",
    [
        (dict(use_gpu=True), {"CPU": 8.0}, "scaling.use_gpu", "no GPUs"),
        (dict(use_gpu=True, num_workers=3), {"CPU": 8.0, "GPU": 2.0}, "scaling.num_workers", "needs 3 GPUs"),
        (dict(num_workers=3), {"CPU": 2.0}, "scaling.num_workers", "needs 3 CPUs"),
        (dict(num_workers=2, resources_per_worker={"CPU": 2}), {"CPU": 2.0}, "scaling.num_workers", "needs 4 CPUs"),
        (dict(amp=True, amp_dtype="float16"), {"CPU": 2.0}, "precision.amp_dtype", "needs GPUs"),
    ],
)
def test_unschedulable_runs_fail_before_any_worker_starts(overrides, cluster, key, reason):
    with pytest.raises(ConfigError) as e:
        resolve_scaling(_cfg(**overrides), cluster)
    assert e.value.key == key and reason in str(e.value)


def test_resolve_records_every_run_wide_decision():
    cfg = resolve(_cfg(lr=None, lr_base=0.1, lr_base_size=256, batch_size=32, num_workers=2), {"CPU": 2.0})
    r = cfg.resolved
    assert r.num_workers == 2 and r.use_gpu is False and r.resources_per_worker is None
    assert r.lr == pytest.approx(0.1 * 64 / 256)  # timm's linear rule on the *global* batch
    assert r.num_classes == 10 and len(r.classes) == 10
    assert r.num_epochs == cfg.sched.epochs
    assert r.data_config["input_size"] == [3, 32, 32]


def test_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        resolve(_cfg(batch_size=1000, num_workers=2), {"CPU": 2.0})
    assert e.value.key == "data.batch_size"


def test_grey_model_gets_one_averaged_mean_and_std():
    dc = resolve_data_config(_cfg(in_chans=1), 10)
    assert dc["input_size"][0] == 1 and len(dc["mean"]) == 1 and len(dc["std"]) == 1
    assert dc["mean"][0] == pytest.approx((0.485 + 0.456 + 0.406) / 3)


def test_run_paths_default_name_is_unique_and_timm_style(tmp_path):
    cfg = _cfg(output=str(tmp_path))
    first = run_paths(cfg)
    assert first.output == str(tmp_path) and first.experiment.endswith("-resnet10t-32")
    Path(first.run_dir).mkdir()
    second = run_paths(cfg)
    assert second.run_dir != first.run_dir


def _started_run(tmp_path, name="exp"):
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / RAY_SNAPSHOT).write_text("{}")
    (run_dir / "config.yaml").write_text("data: {dataset: digits}\n")
    return run_dir


def _checkpoint(directory: Path, version=FORMAT_VERSION) -> Path:
    """A checkpoint's files as far as the driver looks at them: present, with their checksums in meta.json."""
    directory.mkdir(parents=True)
    for name in (MODEL_FILE, STATE_FILE):
        (directory / name).write_bytes(name.encode())
    files = {name: file_digest(directory / name) for name in (MODEL_FILE, STATE_FILE)}
    (directory / META_FILE).write_text(json.dumps({"format_version": version, "files": files}))
    return directory


def test_a_corrupt_start_checkpoint_is_refused_before_ray(tmp_path):
    ckpt = _checkpoint(tmp_path / "old" / "epoch-0003")
    (ckpt / STATE_FILE).write_bytes(b"flipped")
    with pytest.raises(CheckpointError, match="state.pt: corrupt"):
        init_checkpoint(_cfg(output=str(tmp_path), resume=str(ckpt)))


def _run_without_checkpoints(tmp_path, started_from=None) -> Path:
    """What a driver killed before the run's first checkpoint leaves: our config.yaml, no Ray snapshot."""
    run_dir = tmp_path / "runs" / "early"
    run_dir.mkdir(parents=True)
    resolved = {"lr": 0.01, **({"init_checkpoint": str(started_from)} if started_from else {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "digits"}, "resolved": resolved}))
    return run_dir


def test_run_paths_refuses_to_reuse_a_started_run(tmp_path):
    run_dir = _started_run(tmp_path)
    with pytest.raises(ConfigError, match=f"already holds a run; continue it with --resume {run_dir}"):
        run_paths(_cfg(output=str(tmp_path), experiment="exp"))


@pytest.mark.parametrize("how", ["dir", "name"])
def test_resume_continues_the_run_in_place(tmp_path, how):
    run_dir = _started_run(tmp_path)
    resume = str(run_dir) if how == "dir" else "exp"
    paths = run_paths(_cfg(output=str(tmp_path), resume=resume))
    assert (paths.output, paths.experiment, paths.run_dir) == (str(tmp_path), "exp", str(run_dir))
    assert init_checkpoint(_cfg(output=str(tmp_path), resume=resume)) is None
    assert run_config_file(str(run_dir)) == str(run_dir / "config.yaml")


def test_resume_from_a_checkpoint_starts_a_new_run_from_it(tmp_path):
    ckpt = _checkpoint(tmp_path / "old" / "epoch-0003")
    cfg = _cfg(output=str(tmp_path / "runs"), resume=str(ckpt))
    paths = run_paths(cfg)
    assert paths.output == str(tmp_path / "runs") and not Path(paths.run_dir).exists()
    assert init_checkpoint(cfg) == str(ckpt)


def test_resume_of_a_tampered_checkpoint_fails_before_ray(tmp_path):
    ckpt = _checkpoint(tmp_path / "epoch-0001", version=999)
    with pytest.raises(CheckpointError, match="format 999"):
        init_checkpoint(_cfg(output=str(tmp_path), resume=str(ckpt)))


@pytest.mark.parametrize("how", ["dir", "name"])
def test_a_run_that_died_before_its_first_checkpoint_continues_from_the_checkpoint_it_started_from(tmp_path, how):
    ckpt = _checkpoint(tmp_path / "old" / "epoch-0003")
    run_dir = _run_without_checkpoints(tmp_path, started_from=ckpt)
    cfg = _cfg(output=str(tmp_path / "runs"), resume=str(run_dir) if how == "dir" else "early")
    assert run_paths(cfg).run_dir == str(run_dir)  # continued in place, not a new run
    assert init_checkpoint(cfg) == str(ckpt)


def test_a_run_that_died_before_its_first_checkpoint_and_started_fresh_starts_fresh_again(tmp_path):
    run_dir = _run_without_checkpoints(tmp_path)
    cfg = _cfg(output=str(tmp_path / "runs"), resume=str(run_dir))
    assert run_paths(cfg).run_dir == str(run_dir)
    assert init_checkpoint(cfg) is None


def test_a_run_with_its_own_checkpoints_ignores_the_one_it_started_from(tmp_path):
    run_dir = _run_without_checkpoints(tmp_path, started_from=tmp_path / "deleted-since")
    (run_dir / RAY_SNAPSHOT).write_text("{}")  # Ray restores the run's own latest checkpoint
    assert init_checkpoint(_cfg(output=str(tmp_path / "runs"), resume=str(run_dir))) is None


def test_a_run_without_checkpoints_whose_start_checkpoint_is_gone_fails_before_ray_naming_both(tmp_path):
    gone = tmp_path / "old" / "epoch-0003"
    run_dir = _run_without_checkpoints(tmp_path, started_from=gone)
    with pytest.raises(CheckpointError) as e:
        init_checkpoint(_cfg(output=str(tmp_path / "runs"), resume=str(run_dir)))
    assert f"{run_dir} has no checkpoint of its own yet" in str(e.value) and str(gone) in str(e.value)


class _RayResult:
    """The two fields of ray.train.Result that name the checkpoints Ray registered and kept."""

    def __init__(self, run_dir: Path, kept: list, latest=None):
        self.best_checkpoints = [(SimpleNamespace(path=str(run_dir / name)), {}) for name in kept]
        self.checkpoint = SimpleNamespace(path=str(run_dir / latest)) if latest else None


def test_only_checkpoint_folders_ray_never_registered_are_removed(tmp_path):
    for name in ("epoch-0000", "epoch-0001", "epoch-0001-step-0000008", "epoch-0002-step-0000012"):
        _checkpoint(tmp_path / name)
    (tmp_path / "epoch-notes").mkdir()  # not a checkpoint: left alone
    result = _RayResult(tmp_path, kept=["epoch-0000", "epoch-0001"], latest="epoch-0002-step-0000012")
    assert remove_unregistered_checkpoints(str(tmp_path), result) == ["epoch-0001-step-0000008"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch-0000",
        "epoch-0001",
        "epoch-0002-step-0000012",
        "epoch-notes",
    ]


def test_nothing_is_removed_when_ray_reports_no_checkpoints(tmp_path):
    _checkpoint(tmp_path / "epoch-0000")
    assert remove_unregistered_checkpoints(str(tmp_path), _RayResult(tmp_path, kept=[])) == []
    assert (tmp_path / "epoch-0000").is_dir()


def test_resume_of_nothing_names_what_it_looked_for(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_paths(_cfg(output=str(tmp_path), resume="nope"))
    assert e.value.key == "checkpoint.resume" and RAY_SNAPSHOT in str(e.value) and META_FILE in str(e.value)


def test_a_run_on_s3_is_found_continued_with_its_own_config_and_never_reused(s3_upload, tmp_path):
    """The multi-node setup keeps runs on cloud storage: --resume of such a run must read its config.yaml
    there (not fall back to the digits recipe), and a new run must not take its name."""
    from raytrain_cls.commands.cli import base_recipe, build_parser

    (tmp_path / "runs").mkdir()
    local = _started_run(tmp_path / "runs")
    (local / "config.yaml").write_text(
        "data: {dataset: digits}\nmodel: {model: resnet10t, img_size: 48}\noptim: {lr: 0.02}\n"
    )
    run = s3_upload(local, "unit/runs/exp")  # s3://data/unit/runs/exp?endpoint_override=...
    output = run.replace("/exp?", "?")
    assert find_resume_target(run, "/unused") == ("run", run)
    assert find_resume_target("exp", output) == ("run", run)  # a name under an s3:// --output
    paths = run_paths(_cfg(resume=run))
    assert (paths.output, paths.experiment, paths.run_dir) == (output, "exp", run)
    recipe = base_recipe(build_parser().parse_args(["train", "--resume", run]))
    assert recipe == run_config_file(run) and "config.yaml" in recipe
    cfg = load_config(recipe, {"resume": run})
    assert (cfg.model.model, cfg.model.img_size, cfg.optim.lr) == ("resnet10t", 48, 0.02)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_paths(_cfg(output=output, experiment="exp"))


def test_a_checkpoint_on_s3_is_a_start_checkpoint_checked_before_ray(s3_upload, tmp_path):
    good = s3_upload(_checkpoint(tmp_path / "good"), "unit/ckpts/epoch-0003")
    assert find_resume_target(good, "/unused") == ("checkpoint", good)
    assert init_checkpoint(_cfg(output=str(tmp_path), resume=good)) == good
    bad = s3_upload(_checkpoint(tmp_path / "bad", version=999), "unit/ckpts/epoch-0001")
    with pytest.raises(CheckpointError, match="format 999"):
        init_checkpoint(_cfg(output=str(tmp_path), resume=bad))
    with pytest.raises(ConfigError, match="neither a run directory"):
        find_resume_target(good.replace("epoch-0003", "epoch-0042"), "/unused")


def test_failure_message_names_each_rank_and_its_own_error():
    class WorkerGroupFailure(Exception):
        worker_failures = {
            1: RuntimeError("Traceback ...\n  File x\nValueError: bad shard"),
            0: RuntimeError("NonFiniteLossError: loss is nan"),
        }

    msg = explain_failure(WorkerGroupFailure())
    assert msg == "rank 0: NonFiniteLossError: loss is nan; rank 1: ValueError: bad shard"


def test_a_fixed_size_model_at_another_image_size_is_refused_with_the_fix():
    """A ViT's patch grid is fixed at build time; data at another size would fail inside every worker."""
    with pytest.raises(ConfigError, match=r"model.img_size.*built for 224x224.*--model-kwargs img_size=32"):
        resolve(_cfg(model="deit_tiny_patch16_224", img_size=32), {"CPU": 2.0})
    cfg = resolve(_cfg(model="deit_tiny_patch16_224", img_size=32, model_kwargs={"img_size": 32}), {"CPU": 2.0})
    assert cfg.resolved.data_config["input_size"] == [3, 32, 32]
    resolve(_cfg(model="test_resnet", img_size=40), {"CPU": 2.0})  # convolutional: any size


def test_a_ray_address_nobody_answers_fails_at_once_naming_it():
    """ray.init would retry such an address for minutes, logging GCS timeouts (seen: still at it after 120 s)."""
    import socket

    from raytrain_cls.run.driver import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    for address in ("auto", "local"):
        check_reachable(address)  # Ray's to resolve
    for address, reason in (
        (f"127.0.0.1:{port}", "no Ray cluster answers there"),
        ("no-port-here", "no Ray cluster answers there"),
        ("http://127.0.0.1:8265", "job server address"),
    ):
        with pytest.raises(ConfigError) as e:
            check_reachable(address, timeout=2)
        assert e.value.key == "environment RAY_ADDRESS" and reason in e.value.reason


def test_the_gcs_probe_names_a_refused_token_and_a_port_that_is_no_gcs(monkeypatch):
    """What probe_gcs makes of each answer of Ray's GcsClient (the real one meets a wrong token in
    tests/e2e/test_cluster_jobs.py): a refusal and a timeout fail at once, naming RAY_ADDRESS; anything else is
    left to ray.init; a Ray Client address or 'auto' is never probed."""
    import ray._raylet
    from ray.exceptions import AuthenticationError, RpcError

    from raytrain_cls.run.driver import probe_gcs

    answers = {
        "refused:1": AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing"),
        "silent:1": RpcError("Timed out while waiting for GCS to become available."),
        "odd:1": RpcError("Something else"),
        "broken:1": OSError("anything"),
    }
    asked = []

    def gcs_client(address):
        asked.append(address)
        if address in answers:
            raise answers[address]

    monkeypatch.setattr(ray._raylet, "GcsClient", gcs_client)
    for address, reason in (("refused:1", "refused this driver's token"), ("silent:1", "no Ray GCS answered")):
        with pytest.raises(ConfigError) as e:
            probe_gcs(address)
        assert e.value.key == "environment RAY_ADDRESS" and reason in e.value.reason
    for address in ("odd:1", "broken:1", "fine:1", "ray://h:10001", "auto", "local"):
        probe_gcs(address)
    assert asked == ["refused:1", "silent:1", "odd:1", "broken:1", "fine:1"]


def test_a_refused_token_is_found_however_deep_ray_wraps_it():
    from ray.exceptions import AuthenticationError

    from raytrain_cls.run.driver import refused_token

    try:
        try:
            try:
                raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
            except AuthenticationError as e:
                raise RuntimeError("Failed to connect to GCS.") from e
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from e
    except ConnectionError as e:
        assert refused_token(e)
    assert not refused_token(ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"))


def test_the_start_line_names_the_workers_and_their_cpus():
    from raytrain_cls.run.driver import workers_phrase

    one = resolve(_cfg(), {"CPU": 2.0}).resolved
    assert workers_phrase(one) == "1 CPU worker (2 CPUs)"
    assert workers_phrase(resolve(_cfg(num_workers=2), {"CPU": 2.0}).resolved) == "2 CPU workers"


@pytest.mark.parametrize("address,dashboard", [(None, False), ("auto", "cluster's own")])
def test_the_private_local_ray_starts_without_the_dashboard(monkeypatch, address, dashboard):
    """A command's own local Ray goes without Ray's dashboard (a core for ~1 s of start-up); a cluster named by
    RAY_ADDRESS is joined as it is."""
    import ray

    from raytrain_cls.run.driver import connect

    seen = {}

    class Stop(Exception):
        pass

    def init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Stop):
        connect()
    assert seen.get("include_dashboard", "cluster's own") == dashboard
