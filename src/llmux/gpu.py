"""GPU facts through NVML, when there is one. Everything here degrades to None without NVML."""

from __future__ import annotations

import importlib


def nvml_total_gb() -> float | None:
    """Total memory of device 0 in GB (10^9 bytes), or None without NVML or a GPU."""
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / 1e9
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
