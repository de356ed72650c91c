"""Keep CPU bf16 training off oneDNN's AMX kernels while they can read past a matrix's end.

oneDNN's AMX bf16 brgemm (the kernel behind bf16 convolutions and matmuls on Xeons with AMX-BF16) read the K-tail of
matrix A past its valid columns and relied on zero padding in B to cancel them (oneDNN issue 5717, fixed by
PR 5723 after v3.12). Where those bytes hold a NaN or Inf bit pattern (memory a previous tensor left behind),
``NaN * 0`` is NaN and it leaks into clean output rows: a bf16 run on such a CPU can turn NaN now and then, with
every seed fixed. torch 2.14 ships oneDNN v3.12. Capping oneDNN's ISA one step below AMX avoids the kernel; the cap is
harmless on CPUs without AMX (it is a ceiling) and costs AMX's bf16 speed-up on CPUs with it. A user who sets the
variable keeps their choice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

import torch

ISA_ENV = "ONEDNN_MAX_CPU_ISA"
LEGACY_ISA_ENV = "DNNL_MAX_CPU_ISA"  # the name oneDNN read before its rename; either one is honoured
AMX_FREE_ISA = "AVX512_CORE_BF16"  # the highest ISA below AMX, in oneDNN's spelling


def computes_in_bf16(precision) -> bool:
    """bf16 autocast or bf16 weights (--model-dtype bfloat16)."""
    return (precision.amp and precision.amp_dtype == "bfloat16") or precision.model_dtype == "bfloat16"


def onednn_env(precision, use_gpu: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a worker process needs for CPU bf16 compute: {} when it runs no bf16 on the CPU, or when the
    user already chose oneDNN's ISA. Set before the process's first oneDNN call: oneDNN reads it once."""
    if use_gpu or not computes_in_bf16(precision) or environ.get(ISA_ENV) or environ.get(LEGACY_ISA_ENV):
        return {}
    return {ISA_ENV: AMX_FREE_ISA}


def slow_bf16_note(precision, device_type: str, has_bf16_kernels: Optional[bool] = None) -> Optional[str]:
    """A line for the user when bf16 runs on a CPU without oneDNN's bf16 kernels (no AVX512-BF16 or AMX, e.g. an
    AVX2-only CPU): every bf16 convolution then runs emulated, measured ~50x slower than fp32 (resnet10t, 32 px)."""
    if device_type != "cpu" or not computes_in_bf16(precision):
        return None
    if has_bf16_kernels is None:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent means "cannot tell"
        has_bf16_kernels = check() if check is not None else True
    if has_bf16_kernels:
        return None
    return (
        "Note: this CPU has no bf16 kernels (no AVX512-BF16 or AMX), so bf16 runs emulated, many times slower than "
        "float32: drop --amp / --model-dtype bfloat16 on these workers"
    )
