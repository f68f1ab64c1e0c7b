"""Learned peaks on disk (rule 10): what each model really used, so a restart starts from it.

``<state_dir>/learned.json``::

    {"version": 1,
     "models": {"qwen-7b": {"gb": 6.42, "fingerprint": "3f2a...", "launch": "llama-server -m ...",
                            "updated": 1795883208.3,
                            "residual_gb": 0.51, "load_s": 31.2, "wake_s": 0.84}}}

``residual_gb`` (what it kept asleep, rule 11), ``load_s`` and ``wake_s`` (the last cold load and
wake, for the planner's swap costs) are optional: the last value measured, not a peak.

An entry counts only for the launch it was measured for: ``fingerprint`` is
``state.launch_fingerprint`` (``cmd``, or ``engine`` + ``model`` + ``args``, and ``env``; the same
one that decides whether a reload restarts a model), so a model whose command changed starts from
its configured ``vram_gb`` again. ``launch`` is for people reading the file.

The file is written atomically (a temporary file, then ``os.replace``) each time a peak rises,
merged with what is on disk then (another llmux may share the directory). A file that cannot be
read or parsed is ignored with a warning, and replaced at the next write. This is effects-side
code: the scheduler core never touches it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmux.config import ModelConfig
from llmux.scheduling.state import Known, launch_fingerprint

log = logging.getLogger("llmux.scheduler")

FILE_NAME = "learned.json"
_VERSION = 1


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_STATE_HOME/llmux``, or ``~/.local/state/llmux``."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "llmux"


def state_dir(configured: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``server.state_dir`` (``~`` expanded), or the default."""
    if configured:
        return Path(configured).expanduser()
    return default_state_dir(environ)


def launch_text(spec: ModelConfig) -> str:
    """What was started, for people (the environment is left out: it may hold secrets)."""
    if spec.cmd is not None:
        return spec.cmd
    args = " ".join(f"{k}={v}" for k, v in sorted(spec.args.items()))
    return f"{spec.engine} {spec.model} {args}".strip()


@dataclass(frozen=True)
class Peak:
    gb: float
    fingerprint: str
    launch: str = ""
    updated: float = 0.0
    residual_gb: float = 0.0
    load_s: float | None = None
    wake_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gb": round(self.gb, 4),
            "fingerprint": self.fingerprint,
            "launch": self.launch,
            "updated": round(self.updated, 1),
        }
        if self.residual_gb > 0:
            out["residual_gb"] = round(self.residual_gb, 4)
        for key in ("load_s", "wake_s"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3)
        return out

    @property
    def known(self) -> Known:
        return Known(self.residual_gb, self.load_s, self.wake_s)


class LearnedStore:
    """The learned peaks of one state directory, read once at start and written on each rise."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        self._peaks = self._read(warn=True)
        self._write_failed = False

    def peaks_for(self, models: Mapping[str, ModelConfig]) -> dict[str, float]:
        """Learned GB of each model whose entry was measured for its current launch."""
        out = {}
        for mid, spec in models.items():
            peak = self._peaks.get(mid)
            if peak is not None and peak.fingerprint == launch_fingerprint(spec):
                out[mid] = peak.gb
        return out

    def known_for(self, models: Mapping[str, ModelConfig]) -> dict[str, Known]:
        """Residuals and load and wake times of each model measured for its current launch."""
        out = {}
        for mid, spec in models.items():
            peak = self._peaks.get(mid)
            if peak is not None and peak.fingerprint == launch_fingerprint(spec):
                out[mid] = peak.known
        return out

    def record_known(
        self,
        model_id: str,
        spec: ModelConfig,
        *,
        residual_gb: float | None = None,
        load_s: float | None = None,
        wake_s: float | None = None,
    ) -> bool:
        """Keep what was just measured of ``spec``'s launch (the last value, not a peak); True
        if it was written."""
        fp = launch_fingerprint(spec)
        on_disk = self._read(warn=False)
        self._peaks = {**on_disk, **{k: v for k, v in self._peaks.items() if k not in on_disk}}
        old = self._peaks.get(model_id)
        if old is None or old.fingerprint != fp:
            old = Peak(0.0, fp, launch_text(spec))
        new = dataclasses.replace(
            old,
            updated=time.time(),
            residual_gb=old.residual_gb if residual_gb is None else residual_gb,
            load_s=old.load_s if load_s is None else load_s,
            wake_s=old.wake_s if wake_s is None else wake_s,
        )
        self._peaks[model_id] = new
        return self._try_write()

    def peak(self, model_id: str, fp: str) -> float:
        peak = self._peaks.get(model_id)
        return peak.gb if peak is not None and peak.fingerprint == fp else 0.0

    def record(self, model_id: str, spec: ModelConfig, gb: float) -> bool:
        """Keep ``gb`` as the peak of ``spec``'s launch if it is higher; True if it was written."""
        fp = launch_fingerprint(spec)
        if gb <= self.peak(model_id, fp) + 1e-9:
            return False
        on_disk = self._read(warn=False)
        self._peaks = {**on_disk, **{k: v for k, v in self._peaks.items() if k not in on_disk}}
        if gb <= self.peak(model_id, fp) + 1e-9:
            return False  # another llmux wrote a higher one meanwhile
        old = self._peaks.get(model_id)
        known = old.known if old is not None and old.fingerprint == fp else Known()
        self._peaks[model_id] = Peak(
            gb, fp, launch_text(spec), time.time(), known.residual_gb, known.load_s, known.wake_s
        )
        return self._try_write()

    def _try_write(self) -> bool:
        try:
            self._write()
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot write learned peaks to %s: %s", self.path, exc)
            self._write_failed = True
            return False
        self._write_failed = False
        return True

    def _read(self, *, warn: bool) -> dict[str, Peak]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                log.warning("ignoring learned peaks in %s: %s", self.path, exc)
            return {}
        try:
            data = json.loads(text)
            models = data["models"]
            if not isinstance(models, dict):
                raise TypeError("'models' is not a mapping")
            peaks = {}
            for mid, entry in models.items():
                gb = entry["gb"]
                if not isinstance(gb, int | float) or isinstance(gb, bool) or gb < 0:
                    raise ValueError(f"models.{mid}.gb is not a number of GB")
                peaks[str(mid)] = Peak(
                    float(gb),
                    str(entry["fingerprint"]),
                    str(entry.get("launch", "")),
                    float(entry.get("updated", 0.0)),
                    _seconds(entry.get("residual_gb")) or 0.0,
                    _seconds(entry.get("load_s")),
                    _seconds(entry.get("wake_s")),
                )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if warn:
                log.warning("ignoring learned peaks in %s: not valid (%s)", self.path, exc)
            return {}
        return peaks

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": _VERSION,
            "models": {mid: p.as_dict() for mid, p in sorted(self._peaks.items())},
        }
        fd, tmp = tempfile.mkstemp(prefix=".learned-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
                out.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _seconds(value: Any) -> float | None:
    """An optional non-negative number (seconds or GB); anything else is ignored (None)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None
