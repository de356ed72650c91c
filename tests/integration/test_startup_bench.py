"""bench startup's Ray Train floor: an empty train function on one worker, on the cluster a run would use."""

import pytest

pytestmark = pytest.mark.integration


def test_the_ray_train_floor_reaches_its_empty_function_on_the_running_cluster(ray_local, monkeypatch):
    import ray

    from raytrain_cls.bench.startup import _ray_train_floor

    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    row = _ray_train_floor()
    assert row["path"] == "ray_train" and 0 < row["first_step_s"] < 300, row
