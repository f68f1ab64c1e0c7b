"""Launch specs from config: the command line and environment of each model's child.

The scheduler's process effects are handed ``launch_spec`` (a ``SpecBuilder``) when the app is
built; ``scheduling/`` never imports the engines, nor this module.
"""

from __future__ import annotations

import os
import shlex

from llmux.config import ModelConfig
from llmux.scheduling.launcher import LaunchSpec


def launch_spec(model_id: str, m: ModelConfig, on_cpu: bool = False) -> LaunchSpec:
    """The child's command line, from config only. ``cmd`` is split with shlex, never a shell.
    ``on_cpu``: the model's ``cpu_fallback`` variant."""
    fallback = m.cpu_fallback if on_cpu else None
    if m.cmd is not None:
        cmd = fallback.cmd if fallback is not None and fallback.cmd is not None else m.cmd
        return LaunchSpec(
            model_id=model_id,
            argv=tuple(shlex.split(cmd)),
            health=m.health,
            ready_timeout=m.ready_timeout,
            stop_timeout=m.stop_timeout,
            env=dict(m.env),
        )
    # Engines are optional (the `engines` extra): import only when one is used.
    from llmux.engines import engine_argv, engine_env, engine_health_path

    assert m.engine is not None
    assert m.model is not None
    args = {**m.args, **fallback.args} if fallback is not None else m.args
    # The `model` names requests reach the child with (the relay rewrites only to upstream_model).
    names = [m.upstream_model] if m.upstream_model is not None else [model_id, *m.aliases]
    return LaunchSpec(
        model_id=model_id,
        argv=tuple(engine_argv(m.engine, m.model, args, served_names=names)),
        health=m.health if "health" in m.model_fields_set else engine_health_path(m.engine),
        ready_timeout=m.ready_timeout,
        stop_timeout=m.stop_timeout,
        env={**engine_env(m.engine, os.environ), **m.env},
        inherit_env=False,
    )
