"""Same commit, same numbers: pin the CPU kernels before torch is imported, and fix the thread count.

PyTorch picks its CPU kernels by instruction set at run time (ATen: AVX2 or AVX-512; MKL: AVX2,
AVX-512 or AMX paths; oneDNN likewise), and those kernels sum in different orders. Pinning all three to
AVX2 (ATen's kernels, MKL's CNR branch, oneDNN's ISA) removes the ATen and oneDNN differences between
instruction sets. What it cannot remove, measured (docs/evaluation.md, "Same commit, same numbers"):

- MKL's Conditional Numerical Reproducibility is an Intel-only feature. On an AMD CPU (Zen 4) MKL
  ignores MKL_CBWR's branch (AUTO, AVX512, AVX2,STRICT gave the same bytes), and nothing promises that
  the thread count does not matter: a short training run gave different weights at 1 and 2 threads
  before shared-prefix packing and the same weights after it. (The GEMM shapes probed gave the same
  bytes at 1 and 2 threads; which kernel's order depended on the count was not isolated.)
- Intel and AMD CPUs run different MKL code, so the same commit gives different bytes on the two.

So the guarantee is: the same commit gives the same bytes on every machine of the same CPU kind
(vendor and instruction-set features, `cpu_kind()`), whatever its core count, because every stage runs
`cpu.threads` (params.yaml) torch threads on a CPU (`fix_cpu_threads`). Across kinds the numbers differ
in the 4th-5th digit of a loss; `python -m stages.ci.pr_comment --base HEAD` shows such differences
as within noise. tests/kernel_hashes.json records a short training run's weight hash per kind
(tests/test_kernel_hash.py), so a kernel change (a torch or MKL upgrade) is caught.

Every stage imports this through `stages/__init__.py`, so the pin is set by the stage itself, not
by the user's shell. A variable already set in the environment wins: ATEN_CPU_CAPABILITY=avx512
MKL_CBWR=AUTO ONEDNN_MAX_CPU_ISA=ALL trades equality for this machine's own kernels (AVX-512, AMX for
bf16). ("default" would select ATen's scalar kernels, the slowest.) It has no effect on GPU kernels, and
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


def _cpuinfo() -> tuple[str, set[str]]:
    """(vendor, flags) of the first processor in /proc/cpuinfo; ("", set()) where there is none."""
    vendor, flags = "", set()
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return platform.processor() or platform.machine(), flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if vendor and flags:
            break
    return vendor or platform.machine(), flags


# The instruction-set features that select different MKL / oneDNN / ATen code paths.
KIND_FEATURES = (("avx512f", "avx512"), ("avx512_bf16", "avx512_bf16"), ("amx_tile", "amx"))


def cpu_kind(threads: int | None = None) -> str:
    """The CPU kind that decides a run's bytes: vendor, instruction-set features, thread count,
    e.g. "AuthenticAMD avx512 avx512_bf16, 2 threads"."""
    vendor, flags = _cpuinfo()
    features = [name for flag, name in KIND_FEATURES if flag in flags] or (["avx2"] if "avx2" in flags else [])
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return f"{' '.join([vendor, *features])}, {threads} thread{'s' if threads != 1 else ''}"


def fix_cpu_threads(threads: int, device) -> int:
    """Run `threads` torch threads when computing on the CPU (params.yaml cpu.threads; 0 = leave
    torch's default); returns the count in force. On a GPU nothing changes."""
    import torch

    if getattr(device, "type", str(device)) == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def computed_on(device) -> str:
    """Where a stage's numbers were computed, as recorded in its outputs: the CPU kind, or the GPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return cpu_kind()


def other_kind_note(root=".", lock="dvc.lock", metrics="metrics/train.json") -> str | None:
    """One line when this run rewrote the committed dvc.lock and the committed outputs were computed on
    another kind of CPU (or a GPU): the differences then come from the kernels, not from a change."""
    import json
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    if git("diff", "--quiet", "HEAD", "--", lock).returncode != 1:
        return None  # unchanged (0), or not a git checkout / no commit (128)
    try:
        committed = json.loads(git("show", f"HEAD:{metrics}").stdout or "{}").get("computed_on")
        here = json.loads(open(f"{root}/{metrics}", encoding="utf-8").read()).get("computed_on")
    except (OSError, ValueError, AttributeError):
        return None
    if not here or committed == here:
        return None
    return (f"note: dvc.lock changed because the committed outputs were computed on {committed or 'a machine that did not record its kind'} "
            f"and this run on {here}; float results differ between CPU kinds (docs/evaluation.md). "
            "`python -m stages.ci.pr_comment --base HEAD` shows whether the differences are noise.")

