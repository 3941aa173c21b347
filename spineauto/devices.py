"""The one place that turns ``--device auto|cpu|cuda[:N]`` into a torch device."""
from __future__ import annotations

import torch

from spineauto.errors import SpineautoError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpineautoError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise SpineautoError(f"--device {name!r}: use auto, cpu or cuda")


NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16, from the kernel's CPU flags).

    Elsewhere bf16 is emulated and autocast may lose more than it gains, so CPU AMP is off by
    default there (``--amp`` still turns it on)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def cuda_memory_gb(index: int = 0) -> tuple[float, str] | None:
    """(total memory in GiB, name) of the visible CUDA device ``index``, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return props.total_memory / 1024**3, props.name
