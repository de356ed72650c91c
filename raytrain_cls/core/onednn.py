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

ISA_ENV = "ONEDNN_MAX_CPU_ISA"
LEGACY_ISA_ENV = "DNNL_MAX_CPU_ISA"  # the name oneDNN read before its rename; either one is honoured
AMX_FREE_ISA = "AVX512_CORE_BF16"  # the highest ISA below AMX, in oneDNN's spelling


def onednn_env(precision, use_gpu: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment a worker process needs for CPU bf16 compute: {} when it runs no bf16 on the CPU, or when the
    user already chose oneDNN's ISA. Set before the process's first oneDNN call: oneDNN reads it once."""
    bf16 = (precision.amp and precision.amp_dtype == "bfloat16") or precision.model_dtype == "bfloat16"
    if use_gpu or not bf16 or environ.get(ISA_ENV) or environ.get(LEGACY_ISA_ENV):
        return {}
    return {ISA_ENV: AMX_FREE_ISA}
