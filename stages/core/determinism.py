"""Same commit, same numbers: pin the CPU kernels' instruction set before torch is imported.

PyTorch picks its CPU kernels by instruction set at run time (ATen: AVX2 or AVX-512; MKL: AVX2,
AVX-512 or AMX paths; oneDNN likewise), and those kernels sum in different orders. The same training
run then gives weights that differ from the 5th digit on an AVX-512 laptop, an AVX2 GitHub runner
and an AMX server, and every model output in dvc.lock gets a new hash. Pinning all three to AVX2,
which every x86-64 machine of the last decade has, makes a CPU run bit-for-bit the same across them
(docs/evaluation.md has the measurement and the speed cost).

Every stage imports this through `stages/__init__.py`, so the pin is set by the stage itself, not
by the user's shell. A variable already set in the environment wins: ATEN_CPU_CAPABILITY=avx512
MKL_CBWR=AUTO ONEDNN_MAX_CPU_ISA=ALL trades equality across machines for this machine's own kernels
(AVX-512, AMX for bf16). ("default" would select ATen's scalar kernels, the slowest.) It has no effect on GPU kernels, and
none on ARM machines, whose kernels differ from x86 ones anyway.
"""

from __future__ import annotations

import os
import platform
import sys

# MKL's Conditional Numerical Reproducibility: the AVX2 code path, and STRICT so that results do
# not depend on the number of threads either.
PORTABLE_CPU = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
}


def pin_cpu_isa() -> dict[str, str]:
    """Set the portable kernel selection unless torch is already loaded or the variable is set.
    Returns what is in force (for the training manifest)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    if "torch" not in sys.modules:
        for name, value in PORTABLE_CPU.items():
            os.environ.setdefault(name, value)
    return {name: os.environ.get(name, "") for name in PORTABLE_CPU}
