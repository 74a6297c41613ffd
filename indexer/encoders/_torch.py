"""Torch plumbing shared by the torch encoder families. Imported only from ``load()`` onwards."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from indexer.encoders.base import Vectors, l2_normalise

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_threads_lock = threading.Lock()
_threads_done = False


def resolve_device(device: str | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``fp32``, ``bf16``, or ``auto``: bf16 on a bf16-capable GPU or a CPU with AMX (where it
    measured ~2x faster at cosine >= 0.999 to fp32), else fp32."""
    if dtype == "auto":
        dtype = "bf16" if _native_bf16(device) else "fp32"
        log.info("dtype auto -> %s on %s", dtype, device)
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)} or auto, got {dtype!r}")
    if dtype == "bf16" and device.type == "cpu" and not _native_bf16(device):
        log.warning("bf16 on a CPU without AMX is emulated and slower than fp32")
    return TORCH_DTYPES[dtype]


def _native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run in hardware on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            return any("amx_bf16" in line for line in fh if line.startswith("flags"))
    except OSError:  # not Linux: stay with fp32
        return False


def configure_cpu_threads() -> None:
    """Cap torch's intra-op threads at the CPUs this process may run on (once per process).

    torch counts the host's cores; in a container pinned to fewer CPUs that oversubscribes.
    A value set by the user (``torch.set_num_threads``, OMP_NUM_THREADS) below the cap stays.
    """
    global _threads_done
    with _threads_lock:
        if _threads_done:
            return
        _threads_done = True
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        if torch.get_num_threads() > available:
            torch.set_num_threads(available)
        log.debug("torch intra-op threads: %d", torch.get_num_threads())


def normalised_pixels(
    crops: NDArray[np.uint8],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised (n, 3, H, W) tensor on ``device`` in ``dtype``.

    The uint8 batch crosses to the device (4x fewer bytes than float) and is normalised there;
    on CUDA it goes through pinned memory, so the copy runs while this thread moves on.
    """
    host = torch.from_numpy(crops)
    if device.type == "cuda":
        host = host.pin_memory()
    x = host.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=device).mul(255.0).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).mul(255.0).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous().to(dtype)


def to_vectors(features: torch.Tensor) -> Vectors:
    """Model output (n, dim), any float dtype/device -> float32 numpy, L2-normalised rows."""
    return l2_normalise(features.detach().float().cpu().numpy())
