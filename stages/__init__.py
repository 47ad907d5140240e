"""The pipeline's stages. Importing the package pins the CPU kernels' instruction set before torch
loads, so that every stage computes the same numbers on every x86-64 machine (core/determinism.py)."""

from .core.determinism import pin_cpu_isa as _pin_cpu_isa

_pin_cpu_isa()
