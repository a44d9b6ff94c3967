"""The `python -m src.<name>` entry points alike: each has its own `--help` page that exits 0, src.export is a
Hydra app like train/generate/eval (typed keys, errors that name the key), every entry point takes its
environment from src.bootstrap, and no two top-level src modules import each other."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.test_layering import imported_modules

pytestmark = pytest.mark.config

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONF = ROOT / "conf"

# Hydra apps -> their root config (conf/<name>.yaml) and what their own help page must name.
HYDRA_APPS = {
    "train": ("experiment=", "ckpt_path=", "paths.output_dir="),
    "generate": ("experiment=", "mode=", "exported=DIR"),
    "eval": ("experiment=", "task=", "data.path="),
    "export": ("ckpt_path=", "detok_ckpt_path=", "out=DIR", "base=", "dtype=", "official=", "chat_format="),
    "inspect": ("experiment=",),
    "inspect_data": ("experiment=", "records=", "limit="),
    "app": ("experiment=", "app.port="),
}
# argparse / key=value entry points: `main(argv)` prints their page for --help
PLAIN_APPS = ("bench", "bench_init", "bench_gpu", "demo", "report")


def help_page(name: str) -> str:
    """The text Hydra prints for `python -m src.<name> --help` (its hydra.help node, interpolations resolved)."""
    import src.export  # noqa: F401  (registers conf/export.yaml's export_schema, as `python -m src.export` does)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    assert cfg.hydra.help.app_name == f"src.{name}", f"conf/{name}.yaml has no `override hydra/help: {name}`"
    return f"{cfg.hydra.help.header}\n{cfg.hydra.help.footer}"


@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
def test_each_hydra_app_has_its_own_help_page_naming_its_options(name):
    assert (CONF / "hydra" / "help" / f"{name}.yaml").is_file()
    page = help_page(name)
    assert page.startswith(f"src.{name}: ")
    for option in HYDRA_APPS[name]:
        assert option in page, (name, option)


def test_eval_help_lists_every_task_and_generate_help_every_mode():
    from src.eval import TASKS
    from src.pipelines.conversation import MODES

    page = help_page("eval")
    for task in TASKS:
        assert f"\n  {task} " in page, task
    page = help_page("generate")
    for mode in MODES:
        assert f"mode={mode} " in page, mode


def test_export_help_lists_every_output_and_every_key():
    from dataclasses import fields

    from src.export import ExportConfig

    page = help_page("export")
    for folder in ("llm/", "lora/", "base/", "agent/model.safetensors", "vit/model.safetensors", "detokenizer/",
                   "official/", "seed_tokenizer/model.safetensors"):
        assert f"\n  {folder}" in page, folder
    for field in fields(ExportConfig):
        assert f"{field.name}=" in page, field.name


@pytest.mark.parametrize("name", PLAIN_APPS)
def test_plain_entry_points_print_help_and_exit_0(name, capsys):
    import importlib

    main = importlib.import_module(f"src.{name}").main
    try:
        main(["--help"])
    except SystemExit as stop:
        assert stop.code in (0, None), stop.code
    assert f"src.{name}" in capsys.readouterr().out


def test_export_config_is_typed_and_names_the_bad_key(tmp_path):
    """`official=maybe` and a missing `out` fail in composition, naming the key, before any checkpoint is read;
    the old key names still compose to the values export() takes."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import MissingMandatoryValue

    import src.export  # noqa: F401  (registers export_schema)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"out={tmp_path}", "ckpt_path=a.ckpt", "official=true",
                                                       "dtype=fp16", "chat_format=vicuna", "base=/b"])
        assert (cfg.out, cfg.ckpt_path, cfg.official, cfg.dtype, cfg.chat_format, cfg.base, cfg.detok_ckpt_path) \
            == (str(tmp_path), "a.ckpt", True, "fp16", "vicuna", "/b", None)
        with pytest.raises(ConfigCompositionException, match="official=maybe"):
            compose(config_name="export", overrides=[f"out={tmp_path}", "official=maybe"])
        cfg = compose(config_name="export", overrides=["ckpt_path=a.ckpt"])
    with pytest.raises(MissingMandatoryValue, match="out"):
        _ = cfg.out


@pytest.mark.parametrize("bad, key", [("dtype", "dtype='fp8'"), ("chat_format", "chat_format='nope'")])
def test_export_refuses_bad_values_before_reading_the_checkpoint(tmp_path, bad, key):
    from src.export import export

    kwargs = {"dtype": "fp8"} if bad == "dtype" else {"chat_format": "nope"}
    with pytest.raises(ValueError, match=key):
        export(str(tmp_path / "missing.ckpt"), tmp_path / "out", **kwargs)


def _top_level_imports() -> dict[str, set[str]]:
    """src/<name>.py -> the other top-level src modules it imports (lazy imports included)."""
    top = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for path in SRC.glob("*.py"):
        targets = {t.split(".")[1] for _, t in imported_modules(path.read_text(), f"src.{path.stem}")
                   if t.startswith("src.") and t.count(".") >= 1}
        graph[path.stem] = (targets & top) - {path.stem}
    return graph


# src.export_seed uses src.export's HF-writing helpers, which the model-spec work (issue 28 item 1) moves.
KNOWN_CIRCLES = {frozenset({"export", "export_seed"})}


def test_no_import_circle_between_top_level_modules():
    graph = _top_level_imports()
    assert "bench" not in graph["bench_init"] and "bench_init" in graph["bench"]
    circles = {frozenset({a, b}) for a, targets in graph.items() for b in targets if a in graph.get(b, ())}
    assert circles <= KNOWN_CIRCLES, circles - KNOWN_CIRCLES


ENTRY_FILES = ("train", "generate", "eval", "export", "inspect", "inspect_data", "app", "bench", "bench_gpu", "demo")


@pytest.mark.parametrize("name", ENTRY_FILES)
def test_entry_points_take_their_environment_from_bootstrap(name):
    """src.bootstrap is each entry point's first import (before any library reads the variables), and no entry
    point sets WANDB_MODE / TOKENIZERS_PARALLELISM / PROJECT_ROOT itself."""
    source = (SRC / f"{name}.py").read_text()
    body = [n for n in ast.parse(source).body if not isinstance(n, ast.Expr)]  # the docstring
    imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom)) and
               not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert isinstance(imports[0], ast.Import) and imports[0].names[0].name == "src.bootstrap", name
    for var in ("WANDB_MODE", "TOKENIZERS_PARALLELISM", "PROJECT_ROOT"):
        assert f'setdefault("{var}"' not in source, (name, var)


def test_bootstrap_fills_only_unset_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "TOKENIZERS_PARALLELISM", "PROJECT_ROOT")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="online")
    code = ("import os, json, src.bootstrap; print(json.dumps({k: os.environ[k] for k in "
            "('WANDB_MODE', 'TOKENIZERS_PARALLELISM', 'PROJECT_ROOT')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out) == {"WANDB_MODE": "online", "TOKENIZERS_PARALLELISM": "false", "PROJECT_ROOT": str(ROOT)}


# Runs `--help` of every entry point the way `python -m` does (runpy, as __main__, sys.argv replaced), all in one
# process so the libraries are imported once; prints {name: [exit code, page]} as JSON.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
pages = {}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("src." + name, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code
    pages[name] = [code, out.getvalue()]
print(json.dumps(pages))
"""


@pytest.mark.slow  # imports every entry point's libraries (gradio, diffusers, lightning) in one process: minutes
def test_every_entry_point_help_exits_0_with_its_own_page():
    """`--help` of every entry point exits 0 with its own page; src.export's also as its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = [*HYDRA_APPS, *PLAIN_APPS]
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    pages = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        code, page = pages[name]
        assert code in (0, None), (name, code)
        assert f"src.{name}" in page, (name, page[:500])
    proc = subprocess.run([sys.executable, "-m", "src.export", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("src.export: ") and "detokenizer/" in proc.stdout
