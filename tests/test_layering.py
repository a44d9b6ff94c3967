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
PACKAGES = ("models", "data", "specs", "stages", "pipelines", "callbacks", "utils", "evaluation")

# layer -> layers it must not import. data may use plain model modules (src.models.vocab, ViT constants);
# utils may import model config dataclasses. specs (the model recipes, src/specs/base.py) sit between the
# models/data/pipelines they assemble and the stages that train them.
FORBIDDEN: dict[str, frozenset[str]] = {
    "models": frozenset({"data", "specs", "stages", "pipelines", "callbacks", "entry"}),
    "data": frozenset({"specs", "stages", "pipelines", "callbacks", "entry"}),
    "specs": frozenset({"stages", "callbacks", "entry"}),
    "stages": frozenset({"entry"}),
    "pipelines": frozenset({"specs", "stages", "entry"}),
    "utils": frozenset({"stages", "entry"}),
    # benchmark files and scorers: pure functions, no model code
    "evaluation": frozenset({"models", "specs", "stages", "pipelines", "callbacks", "entry"}),
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


# ---- inference builds from the model specs, never from a training stage --------------------------------------
ROOT = SRC.parent
# Entry points that build trained models for inference / export / feature precomputation: they go through
# src/specs (the model recipe), so no training stage (LightningModule) is imported on their way.
INFERENCE_ENTRY_POINTS = ("src.generate", "src.export", "src.export_official", "src.export_seed", "src.eval",
                          "src.lmms", "data_prep.precompute_features")


def module_file(module: str) -> Path | None:
    """The file of a module of this repository (``src.x.y`` -> src/x/y.py or src/x/y/__init__.py), or None."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def transitive_imports(start: str) -> dict[str, str]:
    """Every repository module `start` imports, directly or through others (lazy imports included), each
    with the module that imports it first (the chain is reported on failure)."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        module = todo.pop()
        path = module_file(module)
        if path is None:
            continue
        for _, target in imported_modules(path.read_text(), module, is_package=path.name == "__init__.py"):
            if target.split(".")[0] not in ("src", "data_prep"):
                continue
            # `from src.x import name`: name is a module or a symbol of src.x; take what exists
            found = target if module_file(target) else target.rpartition(".")[0]
            parts = found.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                name = ".".join(parts[:i])
                if name not in seen and module_file(name):
                    seen[name] = module
                    todo.append(name)
    return seen


def import_chain(seen: dict[str, str], module: str) -> str:
    chain = [module]
    while seen.get(chain[-1]):
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


@pytest.mark.parametrize("entry", INFERENCE_ENTRY_POINTS)
def test_inference_entry_points_import_no_stage(entry):
    seen = transitive_imports(entry)
    assert module_file(entry) is not None, entry
    stages = sorted(m for m in seen if m == "src.stages" or m.startswith("src.stages."))
    assert not stages, f"{entry} imports training stages: " + "; ".join(import_chain(seen, m) for m in stages)


def test_transitive_imports_follow_lazy_and_package_imports():
    """The walk itself: src.generate reaches the spec modules (through src.specs.inference) and the package
    __init__ files on the way; a stage module reaches src.stages.base."""
    seen = transitive_imports("src.generate")
    assert {"src.specs.inference", "src.specs.seedx", "src.specs", "src"} <= set(seen)
    assert "src.stages.base" in transitive_imports("src.stages.mllm_sft")


def test_specs_import_no_lightning():
    """The model recipes are plain torch: no Lightning import anywhere under src/specs."""
    bad = []
    for path in sorted((SRC / "specs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not bad, bad
