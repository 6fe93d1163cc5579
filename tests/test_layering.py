"""The layers of claas and the direction of their imports (docs/architecture.md, "Layers").

Every `import` in the package, including the ones inside functions, is read with `ast` and
checked against the layer order below: a module may import its own layer or a lower one, never a
higher one. Two rules are stricter than the order: only the composition root (`claas.runtime`)
builds the local service, and the API never imports a service at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import claas

PACKAGE = Path(claas.__file__).parent

# Lowest first. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        ("claas", "claas.errors", "claas.ids", "claas.records", "claas.runs", "claas.settings"),
    ),
    ("client", ("claas.client",)),  # talks to a server over HTTP: foundation only, no torch
    ("math", ("claas.sdpo.divergence",)),
    ("model files", ("claas.model_files",)),  # where a model is, without torch
    ("services", ("claas.services", "claas.models")),
    ("sdpo", ("claas.sdpo",)),
    ("store", ("claas.store",)),
    ("application", ("claas.chat", "claas.feedback", "claas.adapters")),
    ("composition", ("claas.runtime",)),
    ("api", ("claas.api",)),
    ("entry points", ("claas.eval", "claas.cli")),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in RANK:
            return RANK[prefix]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The claas modules a file imports (`from claas.x import y` counts y if it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("claas"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("claas"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def arrows() -> list[tuple[str, str]]:
    known = modules()
    return [(m, i) for m, p in known.items() for i in sorted(imports_of(p, set(known)))]


def test_every_module_is_in_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_no_import_points_to_a_higher_layer() -> None:
    backward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
        for m, i in arrows()
        if layer_of(i) > layer_of(m)
    ]
    assert backward == [], "imports that point up the layers:\n" + "\n".join(backward)


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("claas.sdpo", ("claas.store", "claas.api", "claas.services.local", "claas.feedback")),
        ("claas.api", ("claas.services",)),
        ("claas.chat", ("claas.services.local", "claas.services.tinker")),
        ("claas.adapters", ("claas.services.local", "claas.services.tinker")),
        ("claas.feedback", ("claas.services.local", "claas.services.tinker")),
    ],
)
def test_stricter_rules(importer: str, forbidden: tuple[str, ...]) -> None:
    broken = [
        f"{m} imports {i}"
        for m, i in arrows()
        if (m == importer or m.startswith(importer + "."))
        and any(i == f or i.startswith(f + ".") for f in forbidden)
    ]
    assert broken == []


def test_the_checker_sees_a_backward_arrow(tmp_path: Path) -> None:
    """The walk is not vacuous: an import from the API inside the SDPO core is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from claas.api.app import create_app\n")
    found = imports_of(bad, set(modules()))
    assert "claas.api.app" in found
    assert layer_of("claas.api.app") > layer_of("claas.sdpo.engine")
