"""The launcher seam: how the scheduler's process effects start and stop one model's child.

The scheduler owns this protocol and acts only through it: ``llmux.backends.process``
implements it with real processes (``ProcessLauncher``), tests with recorders. Launch specs are
built from config outside ``scheduling/`` (``llmux.launch``) and handed to the scheduler as a
``SpecBuilder``, so ``scheduling/`` imports neither the engines nor the backends.
``Launcher.launch`` raises ``llmux.errors.LaunchFailed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from llmux.config import ModelConfig


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to run one model's child. Comes from config only, never from a request."""

    model_id: str
    argv: tuple[str, ...]
    """Already split (shlex for ``cmd``); ``${PORT}`` in any argument is filled with a free port."""
    health: str = "/health"
    """GET path that answers 200 once the child is ready."""
    ready_timeout: float = 300.0
    stop_timeout: float = 10.0
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment on top of llmux's own (or the whole of it, see ``inherit_env``)."""
    inherit_env: bool = True
    """False: ``env`` is the child's entire environment (engines that must not see some of
    llmux's variables)."""


class Child(Protocol):
    """A running, ready child process."""

    @property
    def model_id(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``"""
        ...

    @property
    def returncode(self) -> int | None: ...

    def log_tail(self) -> list[str]:
        """The last lines (at most 50) the child wrote to stdout/stderr."""
        ...

    def log_since(self, seen: int) -> tuple[list[str], int]:
        """Lines after the first ``seen`` ones (as many as are still kept), and the new count."""
        ...

    async def wait_exit(self) -> int:
        """Return the exit status once the process has exited (for any reason)."""
        ...

    async def stop(self, timeout: float) -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; return once it is gone."""
        ...


class Launcher(Protocol):
    async def launch(self, spec: LaunchSpec) -> Child:
        """Spawn the child and wait until ``health`` answers 200.

        Raises ``LaunchFailed`` (with the last output lines) if it cannot be spawned, exits,
        or is not ready within ``ready_timeout``; the process group is killed before raising.
        If cancelled, kills the process group and re-raises.
        """
        ...


SpecBuilder = Callable[[str, ModelConfig, bool], LaunchSpec]
"""``(model_id, its config, on_cpu) -> LaunchSpec``: the child's command line, from config only
(``on_cpu``: its ``cpu_fallback`` variant). ``llmux.launch.launch_spec`` is the real one."""


SleepApiName = Literal["vllm", "sglang"]


class SleepClient(Protocol):
    """How the process effects put a child's engine to sleep and wake it (rules 11-12).

    ``llmux.backends.sleep.HttpSleepClient`` implements it over HTTP; tests may pass a recorder.
    Each call returns once the engine has done it, and raises (any exception; its text becomes
    the reason) if the engine refused or failed. Timeouts are the caller's (``ready_timeout``).
    """

    async def sleep(self, base_url: str, api: SleepApiName, level: int) -> None:
        """vLLM: ``POST /sleep?level=N``; SGLang: ``POST /release_memory_occupation``."""
        ...

    async def wake(self, base_url: str, api: SleepApiName, level: int) -> None:
        """vLLM: ``POST /wake_up``, and after a level-2 sleep ``POST /collective_rpc``
        ``{"method": "reload_weights"}`` then ``POST /reset_prefix_cache``; SGLang: ``POST
        /resume_memory_occupation``."""
        ...
