"""GPU facts through NVML, when there is one (DESIGN rule 10: measure when you can).

``GpuProbe`` is the seam the scheduler's effects use: free and used memory of the device, and the
memory that given processes use. ``NvmlProbe`` is the real one (``nvidia-ml-py``, module
``pynvml``); ``open_probe()`` returns None without NVML or a GPU, and everything then behaves as
if nothing could be measured. Tests inject a fake through the constructors.

All figures are GB (10^9 bytes), like every ``*_gb`` in the config.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("llmux.gpu")

_NOT_AVAILABLE = 2**64 - 1
"""NVML's NVML_VALUE_NOT_AVAILABLE for a process's memory (older bindings pass it through)."""


class GpuProbe(Protocol):
    """What llmux can read of the GPU. Calls are cheap (microseconds with NVML) but may block
    briefly in the driver; the scheduler runs the ones on its load path in a thread."""

    def total_gb(self) -> float:
        """The device's total memory."""
        ...

    def free_gb(self) -> float:
        """Memory the device shows free now (freed memory appears late after a process exits)."""
        ...

    def used_gb(self) -> float:
        """Memory in use on the device, by every process (ours and others)."""
        ...

    def process_gb(self, pids: Collection[int]) -> float:
        """Memory used by these processes and by every process in their process groups.

        ``pids`` are process-group leaders (each model's child runs in its own group, pgid ==
        pid), so helpers a child starts are counted with it. A process whose use NVML cannot
        tell counts 0."""
        ...


def pgid_of(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The process group of ``pid`` (field 5 of ``/proc/<pid>/stat``), or None if it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses; cut at the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[2])
    except (IndexError, ValueError):
        return None


def in_groups(pids: Iterable[int], leaders: Collection[int]) -> set[int]:
    """Those of ``pids`` that are one of ``leaders`` or belong to one of their process groups."""
    roots = set(leaders)
    return {pid for pid in pids if pid in roots or pgid_of(pid) in roots}


class NvmlProbe:
    """``GpuProbe`` over NVML for one device. Opened once (``open``), closed once (``close``)."""

    def __init__(self, nvml: Any, handle: Any, index: int = 0) -> None:
        self._nvml = nvml
        self._handle = handle
        self.index = index
        self._closed = False

    @classmethod
    def open(cls, index: int = 0) -> NvmlProbe:
        """Initialise NVML and take device ``index``. Raises if there is no NVML or no device."""
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceGetMemoryInfo(handle)  # fails early on a device we cannot read
        except BaseException:
            nvml.nvmlShutdown()
            raise
        return cls(nvml, handle, index)

    def name(self) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def _memory(self) -> Any:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle)

    def total_gb(self) -> float:
        return float(self._memory().total) / 1e9

    def free_gb(self) -> float:
        return float(self._memory().free) / 1e9

    def used_gb(self) -> float:
        return float(self._memory().used) / 1e9

    def processes(self) -> dict[int, int]:
        """Every process NVML sees on the device (compute and graphics): pid -> bytes used.

        A process listed twice (compute and graphics) counts once; an unknown use counts 0.
        In a container without the host's pid namespace these are host pids (see
        docs/scheduling.md)."""
        found: dict[int, int] = {}
        nvml = self._nvml
        for getter in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            try:
                listed = getter(self._handle)
            except nvml.NVMLError:
                continue  # e.g. graphics processes are not supported on this device
            for p in listed:
                used = p.usedGpuMemory
                used = 0 if used is None or used >= _NOT_AVAILABLE else int(used)
                found[int(p.pid)] = max(found.get(int(p.pid), 0), used)
        return found

    def process_gb(self, pids: Collection[int]) -> float:
        found = self.processes()
        return float(sum(found[pid] for pid in in_groups(found, pids))) / 1e9

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()


def open_probe(index: int = 0) -> NvmlProbe | None:
    """The NVML probe of device ``index``, or None without NVML (no package, no driver, no GPU)."""
    try:
        return NvmlProbe.open(index)
    except Exception as exc:
        log.debug("no NVML: %s", exc)
        return None


def host_available_gb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """The host's MemAvailable, GB (10^9 bytes); None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        return None
    return None
