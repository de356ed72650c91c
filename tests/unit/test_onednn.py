"""CPU bf16 workers are kept off oneDNN's AMX kernel that leaks NaN (raytrain_cls/onednn.py); nobody else is."""

import pytest

from raytrain_cls.core.config import load_config
from raytrain_cls.core.onednn import AMX_FREE_ISA, ISA_ENV, onednn_env, slow_bf16_note
from raytrain_cls.run.driver import resolve, worker_env


def _precision(**overrides):
    return load_config("digits", overrides).precision


@pytest.mark.parametrize("overrides", [dict(amp=True, amp_dtype="bfloat16"), dict(model_dtype="bfloat16")])
def test_cpu_bf16_caps_the_isa_below_amx(overrides):
    assert onednn_env(_precision(**overrides), use_gpu=False, environ={}) == {ISA_ENV: AMX_FREE_ISA}


@pytest.mark.parametrize(
    "overrides, use_gpu",
    [
        (dict(), False),  # fp32 on the CPU: AMX is never used for fp32, nothing to avoid
        (dict(amp=True, amp_dtype="float16"), True),
        (dict(amp=True, amp_dtype="bfloat16"), True),  # bf16 on GPUs: oneDNN is not in the step
    ],
)
def test_everything_else_keeps_the_environment(overrides, use_gpu):
    assert onednn_env(_precision(**overrides), use_gpu=use_gpu, environ={}) == {}


@pytest.mark.parametrize("variable", [ISA_ENV, "DNNL_MAX_CPU_ISA"])
def test_a_users_own_choice_of_isa_wins(variable):
    assert onednn_env(_precision(amp=True, amp_dtype="bfloat16"), use_gpu=False, environ={variable: "AVX2"}) == {}


def test_train_workers_get_the_cap_in_their_runtime_env(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)  # the test process sets it for itself (conftest)
    bf16 = resolve(load_config("digits", dict(amp=True, amp_dtype="bfloat16")), {"CPU": 2.0})
    fp32 = resolve(load_config("digits", {}), {"CPU": 2.0})
    assert worker_env(bf16) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", ISA_ENV: AMX_FREE_ISA}
    assert worker_env(fp32) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def test_bf16_on_a_cpu_without_bf16_kernels_is_named_with_the_way_out():
    bf16 = _precision(amp=True, amp_dtype="bfloat16")
    note = slow_bf16_note(bf16, "cpu", has_bf16_kernels=False)
    assert "no bf16 kernels" in note and "drop --amp" in note
    assert slow_bf16_note(bf16, "cpu", has_bf16_kernels=True) is None
    assert slow_bf16_note(bf16, "cuda", has_bf16_kernels=False) is None  # oneDNN is not in a GPU step
    assert slow_bf16_note(_precision(), "cpu", has_bf16_kernels=False) is None  # fp32: nothing to say
    assert slow_bf16_note(bf16, "cpu") in (None, note)  # this machine's own answer, whichever it is
