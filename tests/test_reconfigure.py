"""Reconfigure (config reload) at the core: removed models drain and go, changed ones restart."""

from __future__ import annotations

from llmux.errors import ModelNotFound
from llmux.scheduling.events import Measured, ProcessExited, Reconfigure, Release
from llmux.scheduling.state import ModelState, StopReason
from tests.test_core_stateful import make_config, rig

A = {"type": "llm", "vram_gb": 4}
B = {"type": "llm", "vram_gb": 4}


def test_removed_busy_model_drains_then_is_forgotten() -> None:
    r = rig({"a": A, "b": B})
    held = r.ready("a")
    r.send(Reconfigure(make_config({"b": B}), 10.0))
    assert r.state("a") is ModelState.DRAINING
    assert r.rec.stops() == []  # in flight is sacred
    late = r.acquire("a")  # a request that raced the reload
    assert isinstance(r.rec.rejected()[late], ModelNotFound)
    r.send(Release(held))
    assert r.rec.stops() == [("a", 1, StopReason.RELOAD)]
    r.stopped("a")
    assert "a" not in r.core.models
    r.send(ProcessExited("a", 1, 0))  # a late event about it is ignored
    assert set(r.core.models) == {"b"}


def test_changed_model_restarts_and_its_waiters_get_the_new_process() -> None:
    r = rig({"a": A})
    r.send(Release(r.ready("a")))
    changed = {**A, "cmd": "serve a --new-flag --port ${PORT}"}
    r.send(Reconfigure(make_config({"a": changed}), 10.0))
    assert r.rec.stops() == [("a", 1, StopReason.RELOAD)]
    rid = r.acquire("a")  # waits for the old process to go
    r.stopped("a")
    assert r.rec.loads()[-1] == ("a", 2)
    r.loaded("a")
    assert rid in r.rec.granted()
    assert r.core.models["a"].spec is not None
    assert r.core.models["a"].spec.cmd == changed["cmd"]


def test_live_settings_and_budget_apply_without_a_restart() -> None:
    r = rig({"a": A})
    r.send(Release(r.ready("a")))
    r.send(Reconfigure(make_config({"a": {**A, "vram_gb": 5, "ttl": 30}}), 6.0))
    assert r.rec.stops() == []
    assert r.core.models["a"].reservation_gb == 5
    assert r.core.budget_gb == 6.0


def test_how_llmux_waits_for_and_stops_a_process_is_not_its_launch() -> None:
    # One fingerprint of "what was launched" (state.launch_fingerprint), shared with the learned
    # peaks: health and the timeouts change neither the process nor its memory.
    r = rig({"a": A})
    r.send(Release(r.ready("a")))
    r.send(Measured("a", 6.0, 1))
    waits = {**A, "health": "/ready", "ready_timeout": 5, "stop_timeout": 1}
    r.send(Reconfigure(make_config({"a": waits}), 10.0))
    assert r.rec.stops() == []
    assert r.core.models["a"].learned_gb == 6.0
    r.send(Reconfigure(make_config({"a": {**waits, "env": {"X": "1"}}}), 10.0))
    assert r.rec.stops() == [("a", 1, StopReason.RELOAD)]


def test_reload_preloads_an_unloaded_pinned_model_again() -> None:
    p = {"type": "asr", "vram_gb": 2, "pinned": True}
    r = rig({"p": p, "a": A})
    r.send(Reconfigure(make_config({"p": p, "a": A}), 10.0))
    assert r.rec.loads() == [("p", 1)]  # the core's own preload (rig() started no preload)
    r.loaded("p")
    r.unload("p")
    r.stopped("p")
    assert r.state("p") is ModelState.UNLOADED  # an admin unload also unloads a pinned model
    r.send(Reconfigure(make_config({"p": {**p, "vram_gb": 3}, "a": A}), 10.0))
    assert r.rec.loads()[-1] == ("p", 2)  # pinned means resident: a reload loads it again
    r.loaded("p")
    assert r.state("p") is ModelState.READY
    assert r.core.waiters == {}  # nobody waited on the preload
