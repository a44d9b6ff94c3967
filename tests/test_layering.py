"""Import layering of src/: models are plain torch, data builds samples, stages train, entry points sit on top.

Every ``import`` / ``from ... import`` in every file under src/ counts, also ones inside functions (a lazy
import is still a dependency) and under ``TYPE_CHECKING``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"

# Entry points: `python -m src.<name>` modules (and the ones the design names for later).
ENTRY_POINTS = ("train", "inspect", "bench", "generate", "eval", "export", "report", "demo")
PACKAGES = ("models", "data", "stages", "pipelines", "callbacks", "utils", "evaluation")

# layer -> layers it must not import. data may use plain model modules (src.models.vocab, ViT constants);
# utils may import model config dataclasses.
FORBIDDEN: dict[str, frozenset[str]] = {
    "models": frozenset({"data", "stages", "pipelines", "callbacks", "entry"}),
    "data": frozenset({"stages", "pipelines", "callbacks", "entry"}),
    "stages": frozenset({"entry"}),
    "pipelines": frozenset({"stages", "entry"}),
    "utils": frozenset({"stages", "entry"}),
    # benchmark files and scorers: pure functions, no model code
    "evaluation": frozenset({"models", "stages", "pipelines", "callbacks", "entry"}),
}


def layer_of(module: str) -> str | None:
    """``src.models.mllm`` -> ``models``; ``src.train`` -> ``entry``; None outside src or unlayered
    (``src``, ``src.parallel``)."""
    parts = module.split(".")
    if parts[0] != "src" or len(parts) < 2:
        return None
    if parts[1] in PACKAGES:
        return parts[1]
    if parts[1] in ENTRY_POINTS:
        return "entry"
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``, relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if layer_of(base) is not None:
                out.append((node.lineno, base))  # names below a layered module share its layer
            else:  # `from src import data`: each name may be a layered package
                out += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return out


def forbidden_edges(source: str, module: str, where: str, is_package: bool = False) -> list[str]:
    """``where:line module -> target`` for every import of ``source`` that the layering forbids."""
    src_layer = layer_of(module)
    banned = FORBIDDEN.get(src_layer or "", frozenset())
    edges = sorted({(line, target) for line, target in imported_modules(source, module, is_package)
                    if layer_of(target) in banned})
    return [f"{where}:{line} {module} ({src_layer}) -> {target} ({layer_of(target)})" for line, target in edges]


def test_src_import_layering():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        where = str(path.relative_to(SRC.parent))
        problems += forbidden_edges(path.read_text(), module_name(path, SRC), where,
                                    is_package=path.name == "__init__.py")
    assert not problems, "forbidden imports (see tests/test_layering.py FORBIDDEN):\n" + "\n".join(problems)


def test_checker_catches_forbidden_edges():
    """The checker itself: a synthetic model module with a top-level, a lazy and a relative import of data,
    and one of an entry point; allowed edges are not reported."""
    source = (
        "import torch\n"
        "from src.models.pos_emb import patch_pos_term\n"
        "from src.utils.weights import missing_weights_error\n"
        "from src.data.records import BadSample\n"
        "def build():\n"
        "    import src.train\n"
        "    from ..data import records\n"
        "    from src import stages\n"
    )
    edges = forbidden_edges(source, "src.models.fake", "src/models/fake.py")
    assert edges == [
        "src/models/fake.py:4 src.models.fake (models) -> src.data.records (data)",
        "src/models/fake.py:6 src.models.fake (models) -> src.train (entry)",
        "src/models/fake.py:7 src.models.fake (models) -> src.data (data)",
        "src/models/fake.py:8 src.models.fake (models) -> src.stages (stages)",
    ]
    # data -> plain models modules is allowed; data -> stages is not
    assert forbidden_edges("from src.models.vocab import SEEDX_TOKENS\n", "src.data.x", "x.py") == []
    assert forbidden_edges("from src.stages.base import StageModule\n", "src.data.x", "x.py") == [
        "x.py:1 src.data.x (data) -> src.stages.base (stages)"]
    # relative import from a package's __init__ resolves against the package itself
    assert forbidden_edges("from .. import train\n", "src.utils", "src/utils/__init__.py", is_package=True) == [
        "src/utils/__init__.py:1 src.utils (utils) -> src.train (entry)"]


@pytest.mark.parametrize("module, layer", [
    ("src.models.vocab", "models"), ("src.data", "data"), ("src.train", "entry"), ("src.eval.mme", "entry"),
    ("src.parallel", None), ("src", None), ("torch.nn", None), ("srcx.models", None),
])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
