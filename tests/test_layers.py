"""Which package may import which: read from the source (ast), so a new import cannot slip in.

The scheduler acts only through its effects: ``scheduling/`` owns the launcher protocol
(``scheduling/launcher.py``) and never imports what implements it (``backends/``), what builds
launch specs from config (``llmux.launch``, which uses ``engines/``), nor the layers above it.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
SCHEDULING = SRC / "llmux" / "scheduling"

FORBIDDEN = {
    "llmux.scheduling": (
        "llmux.engines",
        "llmux.backends",
        "llmux.launch",
        "llmux.api",
        "llmux.observe",
        "llmux.sim",
        "llmux.cli",
        "llmux.serve",
    ),
}

ALLOWED = {
    # docs/architecture.md, "Which package may import which": what each package may import
    # of llmux besides itself.
    "llmux.engines": ("llmux.errors", "llmux.api.errors"),
    "llmux.backends": ("llmux.errors", "llmux.logs", "llmux.scheduling.launcher"),
    "llmux.config": ("llmux.errors", "llmux.engines.args", "llmux.engines.packaged"),
    "llmux.errors": (),
    "llmux.sim": ("llmux.config", "llmux.errors", "llmux.scheduling"),
}
DENIED = {
    "llmux.api": ("llmux.cli", "llmux.serve", "llmux.sim"),
    "llmux.serve": ("llmux.cli",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module that ``source`` (module ``module``) imports, anywhere in it (relative
    imports resolved), and for ``from X import name`` also ``X.name`` (it may be a module)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                assert node.module is not None
                stem = node.module
            out.add(stem)
            out.update(f"{stem}.{alias.name}" for alias in node.names)
    return out


def imported_by(path: Path) -> set[str]:
    return imported(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("path", sorted(SCHEDULING.glob("*.py")), ids=lambda p: p.name)
def test_scheduling_imports_neither_engines_nor_backends(path: Path) -> None:
    forbidden = FORBIDDEN["llmux.scheduling"]
    bad = sorted(name for name in imported_by(path) if breaks(name, forbidden))
    assert not bad, f"{module_name(path)} imports {bad}: the scheduler acts through its effects"


def test_the_reader_sees_every_kind_of_import() -> None:
    # The rule above is only as good as this reader: it must see plain, from, relative and
    # function-level imports.
    assert "llmux.scheduling.planner" in imported_by(SCHEDULING / "core.py")
    sample = (
        "import llmux.backends.process\n"
        "from ..engines import args\n"
        "def f():\n"
        "    from llmux.launch import launch_spec\n"
    )
    got = imported(sample, "llmux.scheduling.sample")
    assert {"llmux.backends.process", "llmux.engines.args", "llmux.launch.launch_spec"} <= got
    assert all(breaks(name, FORBIDDEN["llmux.scheduling"]) for name in got)


def _modules_of(package: str) -> list[Path]:
    base = SRC / Path(*package.split("."))
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_map_allows(package: str) -> None:
    allowed = (package, *ALLOWED[package])
    for path in _modules_of(package):
        bad = sorted(
            name
            for name in imported_by(path)
            if (name == "llmux" or name.startswith("llmux.")) and not breaks(name, allowed)
        )
        assert not bad, f"{module_name(path)} imports {bad}; docs/architecture.md allows {allowed}"


@pytest.mark.parametrize("package", sorted(DENIED))
def test_package_imports_nothing_above_it(package: str) -> None:
    for path in _modules_of(package):
        bad = sorted(name for name in imported_by(path) if breaks(name, DENIED[package]))
        assert not bad, f"{module_name(path)} imports {bad} (docs/architecture.md)"
