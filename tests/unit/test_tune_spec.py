"""The search spec: every form of a dimension, and every invalid spec refused before any trial starts."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import yaml

from raytrain_cls.core.config import ConfigError, load_config
from raytrain_cls.run.tune import (
    DEFAULT_SPACE,
    SearchSpec,
    TrialRow,
    best_config_yaml,
    check_trial_resources,
    max_epochs,
    parse_dimension,
    parse_search,
    space_from_cli,
    summarize,
    trial_base,
    trial_metrics,
    trial_startup_s,
    validate_search,
    write_trials_csv,
)

BASE = load_config("digits", {"epochs": 6})


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("loguniform:1e-4:1e-1", ("loguniform", [1e-4, 1e-1])),
        ({"uniform": [0, 0.4]}, ("uniform", [0, 0.4])),
        ("choice:sgd,adamw", ("choice", ["sgd", "adamw"])),
        ("grid:16,32", ("grid", [16, 32])),
        ([0.0, 0.1], ("choice", [0.0, 0.1])),
        ("qrandint:16:64:16", ("qrandint", [16, 64, 16])),
    ],
)
def test_dimension_forms(spec, expected):
    assert parse_dimension("k", spec) == expected


def test_default_space_is_lr_mixup_smoothing():
    spec = validate_search(parse_search(None), BASE)
    assert set(spec.space) == set(DEFAULT_SPACE) == {"lr", "mixup", "smoothing"}


def test_cli_dimensions_and_options_override_the_file():
    spec = parse_search(
        {"space": {"lr": "uniform:0.01:0.1"}, "num_samples": 4},
        space_from_cli(["mixup=uniform:0:0.3"]),
        {"num_samples": 2, "scheduler": "fifo"},
    )
    assert set(spec.space) == {"lr", "mixup"} and spec.num_samples == 2 and spec.scheduler == "fifo"


@pytest.mark.parametrize(
    "search, key, reason",
    [
        ({"space": {"lrr": "uniform:0.1:0.2"}}, "search.space.lrr", "did you mean 'lr'"),
        ({"space": {"lr": "uniform:0.2:0.1"}}, "search.space.lr", "low < high"),
        ({"space": {"lr": "loguniform:0:0.1"}}, "search.space.lr", "low > 0"),
        ({"space": {"lr": "normal:0:1"}}, "search.space.lr", "unknown distribution"),
        ({"space": {"lr": "uniform:-0.1:0.2"}}, "search.space.lr", "must be > 0"),
        ({"space": {"opt": "choice:sgd,adamx"}}, "search.space.opt", "not a timm optimizer"),
        ({"space": {"batch_size": "qrandint:16:64:0"}}, "search.space.batch_size", "q must be > 0"),
        ({"space": {"mixup": "uniform:0"}}, "search.space.mixup", "needs 2 numbers"),
        ({"space": {"lr": "0.1"}}, "search.space.lr", "expected KIND:ARGS"),
        ({"scheduler": "pbt"}, "search.scheduler", "not supported"),
        ({"scheduler": "hyperband"}, "search.scheduler", "choose one of"),
        ({"searcher": "optuna"}, "search.searcher", "pip install"),
        ({"num_samples": 0}, "search.num_samples", ">= 1"),
        ({"gpus_per_worker": 1.5}, "search.gpus_per_worker", "fraction"),
        ({"reduction_factor": 1}, "search.reduction_factor", "> 1"),
        ({"num_sample": 3}, "search.num_sample", "did you mean 'num_samples'"),
        # lists that would run trials nobody asked for
        ({"space": {"lr": "choice:"}}, "search.space.lr", "choice lists no values"),
        ({"space": {"lr": "grid: "}}, "search.space.lr", "grid lists no values"),
        ({"space": {"lr": {"choice": None}}}, "search.space.lr", "at least one value"),
        ({"space": {"lr": {"grid": []}}}, "search.space.lr", "at least one value"),
        ({"space": {"opt": "choice:sgd,,adamw"}}, "search.space.opt", "value 2 of 3 is empty"),
        ({"space": {"lr": "grid:0.1,0.2,"}}, "search.space.lr", "value 3 of 3 is empty"),
        ({"space": {"lr": "uniform::0.1"}}, "search.space.lr", "value 1 of 2 is empty"),
        ({"space": {"lr": "grid:0.1,0.1"}}, "search.space.lr", "lists 0.1 more than once"),
        ({"space": {"lr": "grid:0.1,0.2,0.10,0.2"}}, "search.space.lr", "lists 0.1, 0.2 more than once"),
        ({"space": {"batch_size": "grid:16,16.0"}}, "search.space.batch_size", "lists 16 more than once"),
        ({"space": {"opt": ["sgd", "adamw", "sgd"]}}, "search.space.opt", "lists 'sgd' more than once"),
        # the metric, before any trial trains
        ({"metric": "foo"}, "search.metric", "not a metric a trial reports; one of epoch, train_loss"),
        ({"metric": "eval_top"}, "search.metric", "did you mean 'eval_top"),
        ({"metric": "model_eval_top1"}, "search.metric", "only with --model-ema"),
        ({"metric": "startup"}, "search.metric", "not a metric a trial reports"),
        # every option in its range
        ({"mode": "maximize"}, "search.mode", "min or max"),
        ({"mode": True}, "search.mode", "expected a name"),
        ({"searcher": "hyperopt"}, "search.searcher", "choose one of"),
        ({"num_samples": 2.5}, "search.num_samples", "whole number"),
        ({"num_samples": "4"}, "search.num_samples", "expected a number"),
        ({"grace_period": 0}, "search.grace_period", ">= 1"),
        ({"reduction_factor": math.nan}, "search.reduction_factor", "finite"),
        ({"max_concurrent_trials": -1}, "search.max_concurrent_trials", ">= 0"),
        ({"workers_per_trial": 0}, "search.workers_per_trial", ">= 1"),
        ({"cpus_per_worker": 0}, "search.cpus_per_worker", "> 0"),
        ({"cpus_per_worker": math.inf}, "search.cpus_per_worker", "finite"),
        ({"gpus_per_worker": -1}, "search.gpus_per_worker", "fraction"),
        # trials in Tune's own process: one worker, one GPU at most
        ({"in_process": "yes"}, "search.in_process", "expected true or false"),
        ({"in_process": True, "workers_per_trial": 2}, "search.workers_per_trial", "train on one worker"),
        ({"in_process": True, "workers_per_trial": [1, 2]}, "search.workers_per_trial", "train on one worker"),
        ({"in_process": True, "gpus_per_worker": 2}, "search.gpus_per_worker", "one GPU at most"),
    ],
)
def test_invalid_specs_are_refused_with_key_and_reason(search, key, reason):
    with pytest.raises(ConfigError) as e:
        validate_search(parse_search(search), BASE)
    assert e.value.key == key and reason in str(e.value), str(e.value)


def test_an_empty_choice_is_refused_when_parsed_not_run_as_none():
    """`--search lr=choice:` once became [None], and 8 identical trials ran."""
    with pytest.raises(ConfigError, match="choice lists no values"):
        parse_dimension("lr", "choice:")
    assert parse_dimension("opt", "choice: sgd , adamw") == ("choice", ["sgd", "adamw"])
    assert parse_dimension("k", "choice:null,1") == ("choice", [None, 1])  # None, when written, is a value


def test_a_repeat_is_the_same_trial_value_not_the_same_text():
    from raytrain_cls.run.tune import _repeated

    assert _repeated([1, True, 1.0, "1", None, None]) == [1, None]  # 1.0 sets what 1 sets; True and "1" do not
    assert _repeated([[0.5, 0.5], [0.5, 0.5]]) == [[0.5, 0.5]]  # list values (mean, std) compare too
    spec = validate_search(parse_search({"space": {"channels_last": "grid:true,false"}}), BASE)
    assert spec.space["channels_last"] == ("grid", [True, False])


@pytest.mark.parametrize("metric", ["eval_top1", "eval_loss", "eval_top5", "train_loss", "lr", "epoch"])
def test_every_metric_a_trial_reports_is_accepted(metric):
    assert validate_search(parse_search({"metric": metric}), BASE).metric == metric


def test_the_raw_model_metrics_are_accepted_with_an_ema():
    ema = load_config("digits", {"epochs": 6, "model_ema": True})
    assert "model_eval_top1" in trial_metrics(ema) and "model_eval_top1" not in trial_metrics(BASE)
    assert validate_search(parse_search({"metric": "model_eval_top1"}), ema).metric == "model_eval_top1"


def test_the_metric_list_holds_what_the_epoch_functions_return():
    """tune --metric is checked against EPOCH_METRICS, built from these constants: they must stay the keys that
    train_one_epoch and evaluate return, or a valid metric is refused (or a missing one accepted)."""
    import torch

    from raytrain_cls.core.engine import (
        EPOCH_TRAIN_METRICS,
        EVALUATION_KEYS,
        TrainParts,
        autocast_factory,
        evaluate,
        train_one_epoch,
    )

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(2)]
    parts = TrainParts(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        device=cpu,
        autocast=autocast_factory(cpu, False, torch.float32),
    )
    trained, _ = train_one_epoch(0, loader, parts, 0)
    assert tuple(trained) == EPOCH_TRAIN_METRICS
    assert tuple(evaluate(model, loader, cpu, parts.autocast)) == EVALUATION_KEYS
    assert {f"eval_{k}" for k in EVALUATION_KEYS} | set(EPOCH_TRAIN_METRICS) <= set(trial_metrics(BASE))


@pytest.mark.parametrize(
    "spec, cluster, key, reason",
    [
        (SearchSpec(gpus_per_worker=1), {"CPU": 8}, "search.gpus_per_worker", "the Ray cluster has 0; --gpus-per"),
        (SearchSpec(gpus_per_worker=2), {"CPU": 8, "GPU": 1}, "search.gpus_per_worker", "needs 2 GPUs"),
        (
            SearchSpec(workers_per_trial=2, gpus_per_worker=1),
            {"CPU": 8, "GPU": 1},
            "search.workers_per_trial",
            "2 GPUs",
        ),
        (SearchSpec(cpus_per_worker=4), {"CPU": 2}, "search.cpus_per_worker", "needs 4 CPUs but the Ray cluster has 2"),
        (SearchSpec(workers_per_trial=3), {"CPU": 2}, "search.workers_per_trial", "need 3 CPUs (1 each)"),
    ],
)
def test_a_trial_the_cluster_can_never_schedule_is_refused(spec, cluster, key, reason):
    with pytest.raises(ConfigError) as e:
        check_trial_resources(spec, cluster)
    assert e.value.key == key and reason in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "spec, cluster",
    [
        (SearchSpec(), {"CPU": 1}),
        (SearchSpec(workers_per_trial=2, cpus_per_worker=0.5), {"CPU": 1}),
        (SearchSpec(workers_per_trial=4, gpus_per_worker=0.25), {"CPU": 4, "GPU": 1}),
        (SearchSpec(workers_per_trial=8, gpus_per_worker=1), {"CPU": math.inf, "GPU": math.inf}),  # no autoscaler limit
    ],
)
def test_a_trial_the_cluster_can_hold_passes(spec, cluster):
    check_trial_resources(spec, cluster)


def test_the_resource_check_counts_what_an_autoscaler_can_add():
    from raytrain_cls.run.capacity import cluster_capacity

    capacity = cluster_capacity({"CPU": 4}, {"GPU": 2}, "the cluster YAML")
    check_trial_resources(SearchSpec(workers_per_trial=2, gpus_per_worker=1), capacity)
    with pytest.raises(ConfigError, match="has 0 now and its autoscaler can add up to 2 in all"):
        check_trial_resources(SearchSpec(workers_per_trial=3, gpus_per_worker=1), capacity)


def test_a_search_the_cluster_cannot_run_is_refused_before_its_directory_is_made(monkeypatch, tmp_path):
    import raytrain_cls.run.tune as tune

    monkeypatch.setattr(tune, "connect", lambda: {"CPU": 2})
    base = load_config("digits", {"epochs": 1, "output": str(tmp_path), "experiment": "s"})
    spec = validate_search(parse_search({"gpus_per_worker": 1}), base)
    with pytest.raises(ConfigError) as e:
        tune.tune_search(base, spec, echo=lambda *a: None)
    assert e.value.key == "search.gpus_per_worker" and not (tmp_path / "s").exists()


def test_asha_max_t_is_the_longest_schedule_in_the_space():
    assert max_epochs(BASE, parse_search({"space": {"lr": "uniform:0.01:0.1"}})) == 6
    spec = parse_search({"space": {"epochs": "choice:3,9", "cooldown_epochs": "choice:0,2"}})
    assert max_epochs(BASE, spec) == 11


def test_trials_run_with_the_per_trial_scaling():
    spec = SearchSpec(workers_per_trial=2, cpus_per_worker=3, gpus_per_worker=0.25)
    cfg = trial_base(BASE, spec)
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu is True
    assert cfg.scaling.resources_per_worker == {"CPU": 3, "GPU": 0.25}


def _result(trial_id, lrs_metric, error=None, lr=0.1):
    import pandas as pd

    df = pd.DataFrame(
        {
            "epoch": list(range(len(lrs_metric))),
            "eval_top1": lrs_metric,
            "checkpoint_path": [f"/runs/{trial_id}/epoch-{i:04d}" for i in range(len(lrs_metric))],
        }
    )
    return SimpleNamespace(
        metrics_dataframe=df, metrics={"trial_id": trial_id}, error=error, config={"lr": lr}, path=f"/tune/{trial_id}"
    )


def test_summary_orders_by_best_and_marks_early_stops(tmp_path):
    spec = parse_search({"space": {"lr": "uniform:0.01:0.1"}})
    rows = summarize(
        [
            _result("a", [50, 60], lr=0.01),
            _result("b", [40, 70, 90, 85], lr=0.1),
            _result("c", [], error=RuntimeError("boom")),
        ],
        spec,
        BASE,
        max_t=4,
    )
    assert [(r.trial_id, r.status) for r in rows] == [("b", "completed"), ("a", "stopped"), ("c", "error")]
    assert rows[0].best == 90 and rows[0].best_epoch == 2 and rows[0].checkpoint == "/runs/b/epoch-0002"
    write_trials_csv(str(tmp_path / "trials.csv"), rows, ["lr"], "eval_top1")
    with (tmp_path / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert table[0]["trial_id"] == "b" and table[1]["status"] == "stopped" and table[0]["epochs"] == "4"
    assert table[0]["startup_s"] == ""  # these trials reported no start-up stamps


def test_a_trial_ctrl_c_left_running_is_unfinished_not_stopped_early(tmp_path):
    from raytrain_cls.run.tune import total_trials

    spec = parse_search({"space": {"lr": "uniform:0.01:0.1"}, "num_samples": 3})
    results = [_result("a", [50, 60, 70, 80]), _result("b", [40, 45]), _result("c", [30])]
    # b: stopped by ASHA; c: running when Ctrl-C came, which Tune saves as PENDING so that --resume runs it
    rows = summarize(results, spec, BASE, max_t=4, states={"a": "TERMINATED", "b": "TERMINATED", "c": "PENDING"})
    assert [(r.trial_id, r.status) for r in rows] == [("a", "completed"), ("b", "stopped"), ("c", "unfinished")]
    assert total_trials(spec) == 3
    grid_spec = parse_search({"space": {"lr": "grid:0.01,0.1", "mixup": "grid:0,0.2,0.4"}, "num_samples": 2})
    assert total_trials(grid_spec) == 2 * 2 * 3  # num_samples for each grid point, as Tune counts
    # Without Tune's saved states, no trial is called unfinished (a trial never started still shows the gap).
    assert [r.status for r in summarize([_result("c", [30])], spec, BASE, max_t=4, search_dir=str(tmp_path))] == [
        "stopped"
    ]
    # Trials without metrics are named by their directory, which holds the id
    named = summarize([_result("run_trial_c_3_lr=0.05", [30])], spec, BASE, max_t=4, states={"c": "RUNNING"})
    assert named[0].status == "unfinished"


def test_trials_say_what_each_fit_cost_before_its_first_step():
    stamps = {"driver": 10.0, "ray_ready": 10.5, "fit": 11.0, "worker_entered": 30.0, "first_step": 34.25}
    assert trial_startup_s({"startup": stamps}) == 24.25
    assert trial_startup_s({f"startup/{k}": v for k, v in stamps.items()}) == 24.25  # as Tune may flatten them
    assert trial_startup_s({"startup": {"driver": 10.0, "fit": 11.0}}) is None  # never reached its first step
    assert trial_startup_s({}) is None
    # run_trial stamps its process taking the trial: the trial's own imports count too
    assert trial_startup_s({"startup": {"process": 4.0, **stamps}}) == 30.25


def test_best_yaml_is_a_complete_training_config(tmp_path):
    best = TrialRow("b", "completed", {"lr": 0.05, "mixup": 0.2}, 91.0, 3, 4, "/runs/b/epoch-0003", [])
    text = best_config_yaml(BASE, best, 4)
    assert "--initial-checkpoint /runs/b/epoch-0003" in text
    path = tmp_path / "best.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.optim.lr == 0.05 and cfg.aug.mixup == 0.2 and "resolved" not in yaml.safe_load(text)


def test_a_search_directory_on_s3_is_resumed_there_and_never_reused(s3_upload, tmp_path):
    from raytrain_cls.run.tune import SEARCH_FILE, search_paths

    (tmp_path / "search").mkdir()
    (tmp_path / "search" / SEARCH_FILE).write_text("search: {}\n")
    uri = s3_upload(tmp_path / "search", "unit/tune/s1")
    output = uri.replace("/s1?", "?")
    assert search_paths(load_config("digits"), uri) == (output, "s1", uri)
    with pytest.raises(ConfigError, match="not a search directory"):
        search_paths(load_config("digits"), uri.replace("/s1?", "/s2?"))
    with pytest.raises(ConfigError, match="already exists"):
        search_paths(load_config("digits", {"output": output, "experiment": "s1"}), None)


def test_an_initial_checkpoint_file_under_a_uri_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match="give the checkpoint directory"):
        load_config("digits", {"initial_checkpoint": "s3://bucket/runs/x/epoch-0003/model.safetensors"})


def test_a_trial_clocks_its_start_up_from_its_own_process_taking_it(monkeypatch, tmp_path):
    """A trial hands fit_run the moment its process first imported raytrain_cls (Tune unpickling the trial
    function), so a trial's startup_s includes the imports every trial pays again, not only its fit()."""
    from ray import tune as ray_tune

    import raytrain_cls
    from raytrain_cls.run import driver, trial

    seen = {}
    monkeypatch.setattr(ray_tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t_00001"))
    monkeypatch.setattr(trial, "epoch_report_callback", lambda: "callback")  # needs a Tune session
    monkeypatch.setattr(driver, "fit_run", lambda cfg, paths, **kw: seen.update(kw, lr=cfg.optim.lr))
    trial.run_trial({"lr": 0.05}, BASE.to_dict(), str(tmp_path))
    assert seen["lr"] == 0.05
    assert seen["stamps"] == {"process": raytrain_cls.IMPORTED_AT}


TRIAL_WITH_FACTS = """
import json, sys, types
import ray
from ray import tune
import raytrain_cls.run.trial as trial
from raytrain_cls.core.facts import RunFacts

base = json.load(open({base_file!r}))  # the search's base config, as Tune hands it to the trial
facts = RunFacts(10, [str(i) for i in range(10)], 1437, 360, {{"input_size": [1, 32, 32]}}, 6)
seen = {{}}
tune.get_context = lambda: types.SimpleNamespace(get_trial_id=lambda: "t_00003")
trial.epoch_report_callback = lambda: "callback"
import raytrain_cls.run.driver as driver
driver.fit_run = lambda cfg, paths, **kw: seen.update(kw, opt=cfg.optim.opt)
trial.run_trial({params}, base, {search_dir!r}, base_facts=facts)
print(seen["facts"] is facts, seen["opt"], "timm" in sys.modules)
"""


@pytest.mark.parametrize(
    "params, takes_facts, timm",
    [
        ({"lr": 0.05, "mixup": 0.2, "smoothing": 0.0}, True, False),
        ({"lr": 0.05, "opt": "adamw"}, False, True),  # the optimizer's name is looked up in timm's registry
    ],
)
def test_a_trial_that_changes_only_fact_free_keys_never_imports_timm(tmp_path, params, takes_facts, timm):
    """In a trial's fresh process (as Tune's actor), the search's facts for its base config resolve the run, and
    neither the checks before Ray nor the loop (timm) are imported: only its train workers load them. A trial that
    changes another key looks its values up itself."""
    import json
    import subprocess
    import sys

    base_file = tmp_path / "base.json"
    base_file.write_text(json.dumps(BASE.to_dict()))
    script = TRIAL_WITH_FACTS.format(params=params, search_dir=str(tmp_path), base_file=str(base_file))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(takes_facts), params.get("opt", "sgd"), str(timm)], out.stdout


def test_a_trial_that_changes_the_schedule_runs_its_own_checks(monkeypatch, tmp_path):
    from ray import tune as ray_tune

    from raytrain_cls.core.facts import RunFacts
    from raytrain_cls.run import driver, trial

    seen = {}
    facts = RunFacts(10, [str(i) for i in range(10)], 1437, 360, {"input_size": [1, 32, 32]}, 6)
    monkeypatch.setattr(ray_tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t_00004"))
    monkeypatch.setattr(trial, "epoch_report_callback", lambda: "callback")
    monkeypatch.setattr(driver, "fit_run", lambda cfg, paths, **kw: seen.update(kw))
    trial.run_trial({"lr": 0.05, "epochs": 3}, BASE.to_dict(), str(tmp_path), base_facts=facts)
    assert seen["facts"] is None  # resolve() runs the checks for this trial's 3-epoch schedule


@pytest.mark.parametrize(
    "setting, key, reason",
    [
        (("checkpoint", "output", "s3://bucket/searches"), "checkpoint.output", "local (or mounted) search directory"),
        (("data", "loader", "ray"), "data.loader", "Ray Train workers only"),
    ],
)
def test_what_an_in_process_trial_cannot_do_is_refused_before_any_trial(setting, key, reason):
    from raytrain_cls.run.tune import check_in_process

    base = BASE.copy()
    group, name, value = setting
    setattr(getattr(base, group), name, value)
    with pytest.raises(ConfigError) as e:
        check_in_process(SearchSpec(in_process=True), base)
    assert e.value.key == key and reason in str(e.value), str(e.value)


def test_the_in_process_flag_reaches_the_search_spec():
    from raytrain_cls.commands.cli import build_parser

    def spec_of(argv: list[str]) -> SearchSpec:
        args = build_parser().parse_args(argv)
        options = {k.removeprefix("search__"): v for k, v in vars(args).items() if k.startswith("search__")}
        return parse_search({}, cli=options)

    assert spec_of(["tune", "--in-process", "--num-samples", "2"]).in_process is True
    assert spec_of(["tune"]).in_process is False


def test_an_in_process_trial_trains_in_its_own_process(monkeypatch, tmp_path):
    """A trial with in_process goes to trial_process with stamps from this process, not to a Ray Train fit."""
    from ray import tune as ray_tune

    from raytrain_cls.run import driver, trial, trial_process

    seen = {}
    monkeypatch.setattr(ray_tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t_00002"))
    monkeypatch.setattr(driver, "fit_run", lambda *a, **kw: pytest.fail("a Ray Train fit for an in-process trial"))
    monkeypatch.setattr(
        trial_process, "train_in_trial", lambda cfg, paths, stamps, facts: seen.update(stamps=stamps, facts=facts)
    )
    trial.run_trial({"lr": 0.05}, BASE.to_dict(), str(tmp_path), in_process=True)
    assert "in_process" in seen["stamps"]
