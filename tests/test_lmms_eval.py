"""The lmms-eval adapter (src/lmms.py): found through lmms-eval's plugin entry points, loads a tiny model and
answers a generate_until and a loglikelihood request; the real `lmms-eval` command line runs a bundled local task
(assets/eval/lmms_eval) offline. Needs the [eval] extra (make setup installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval", reason="the [eval] extra (lmms-eval) is not installed")

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    from lmms_eval.models import get_model

    # as `lmms-eval --model seedx --model_args ... --batch_size 2 --device cpu` builds it
    m = get_model("seedx").create_from_arg_string("experiment=seedx_pretrain_tiny,max_new_tokens=8",
                                                  {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    image = Image.open(ROOT / "assets" / "sample" / "images" / "chelsea.jpg")
    m.task_dict = {"toy": {"test": {0: {"image": image}, 1: {"image": image.rotate(90)}}}}
    return m


def instance(kind: str, args: tuple, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(kind, args, doc_id, {"task": "toy", "doc_id": doc_id, "repeats": 1})


def visuals(doc):
    return [doc["image"]]


def test_the_plugin_is_registered_through_entry_points():
    from lmms_eval.models import MODEL_REGISTRY_V2

    assert MODEL_REGISTRY_V2.get_manifest("seedx").simple_class_path == "src.lmms.SeedX"


def test_generate_until_and_loglikelihood_agree_on_the_greedy_answer(model):
    reqs = [instance("generate_until", ("<image>\nWhat animal is this?", {"until": ["\n\n"], "max_new_tokens": 6},
                                        visuals, i, "toy", "test"), i) for i in range(2)]
    answers = model.generate_until(reqs)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # the greedy answer is, by definition, the greedy continuation: loglikelihood must say so
    (ll, greedy), = model.loglikelihood([instance("loglikelihood", ("<image>\nWhat animal is this?", answers[0],
                                                                     visuals, 0, "toy", "test"), 0)])
    if model.tokenizer.encode(answers[0], add_special_tokens=False):
        assert ll < 0 and greedy
    (ll_other, greedy_other), = model.loglikelihood([instance("loglikelihood", (
        "<image>\nWhat animal is this?", " zebra crossing at night", visuals, 0, "toy", "test"), 0)])
    assert ll_other < 0 and not greedy_other
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round(reqs)


def test_requests_of_different_tasks_keep_their_own_generation_kwargs_and_order(model):
    model.task_dict["other"] = {"test": model.task_dict["toy"]["test"]}
    reqs = [instance("generate_until", ("<image>\nName it.", {"max_new_tokens": n}, visuals, i % 2, task, "test"), i)
            for i, (task, n) in enumerate([("toy", 1), ("other", 6), ("toy", 1), ("other", 6)])]
    answers = model.generate_until(reqs)
    assert answers[0] == answers[2] and answers[1] == answers[3]  # same question, same kwargs -> same answer
    assert len(model.tokenizer.encode(answers[0], add_special_tokens=False)) <= 2  # max_new_tokens=1 held


def test_the_environment_satisfies_the_eval_constraints():
    """lmms-eval 0.7.3 dies on filelock 4.x (`No module named 'filelock._api'`, exit code 0): make setup installs
    with constraints/eval.txt, and this environment must match it."""
    from packaging.requirements import Requirement

    lines = (ROOT / "constraints" / "eval.txt").read_text().splitlines()
    pins = [Requirement(ln.split("#")[0]) for ln in lines if ln.split("#")[0].strip()]
    assert {p.name for p in pins} >= {"antlr4-python3-runtime", "filelock"}
    for pin in pins:
        try:
            installed = version(pin.name)
        except PackageNotFoundError:
            continue
        assert pin.specifier.contains(installed), f"{pin.name} {installed} breaks {pin} (run make setup)"
    import filelock._api  # noqa: F401 - what lmms-eval's evaluator imports


def test_batch_size_and_device_come_from_lmms_eval_not_model_args():
    from lmms_eval.models import get_model

    cls = get_model("seedx")
    for args in ("experiment=seedx_pretrain_tiny,batch_size=8", "experiment=seedx_pretrain_tiny,device=cpu"):
        with pytest.raises(ValueError, match=r"lmms-eval's own arguments: pass --(batch_size|device)"):
            cls.create_from_arg_string(args, {"batch_size": 1, "device": None})
    with pytest.raises(ValueError, match=r"unknown --model_args \['ckpt'\]"):
        cls.create_from_arg_string("experiment=seedx_pretrain_tiny,ckpt=x.ckpt", {"batch_size": 1})
    with pytest.raises(ValueError, match="--batch_size must be a number"):
        cls.create_from_arg_string("experiment=seedx_pretrain_tiny", {"batch_size": "auto"})


def test_text_answers_leave_out_generated_image_spans_and_keep_boxes(model):
    from src.lmms import answer_text
    from src.models.vocab import NUM_IMG_TOKENS_USED

    tok, ids = model.tokenizer, model.generator.ids
    words = tok.encode("A cat", add_special_tokens=False)
    more = tok.encode(" sits here", add_special_tokens=False)
    image = [ids.img_start, *ids.img[:NUM_IMG_TOKENS_USED], ids.img_end]
    box = [ids.box_start, ids.loc[10], ids.loc[20], ids.loc[30], ids.loc[40], ids.box_end]
    text = answer_text([*words, *image, *more, *box, tok.eos_token_id], tok, ids)
    assert "<img" not in text and "</img>" not in text
    assert text == "A cat sits here<box_start><loc-10><loc-20><loc-30><loc-40><box_end>"
    assert answer_text([*image], tok, ids) == answer_text([ids.img[3], ids.img_end, *image[:10]], tok, ids) == ""


def lmms_eval_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The `lmms-eval` console script of this environment, offline, from the repository root."""
    script = Path(sys.executable).with_name("lmms-eval")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "lmms_eval"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_HOME": str(out / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow  # one lmms-eval process (~1 min here: its import alone takes ~20 s)
def test_lmms_eval_command_line_scores_the_bundled_task(model, tmp_path, monkeypatch):
    """The README's command on the bundled task: lmms-eval finds our plugin and the local task, and writes the
    scores and the sample log. lmms-eval exits 0 even when it crashed, so its outputs are what is checked."""
    out = tmp_path / "lmms"
    proc = lmms_eval_cli(out, "--model", "seedx", "--model_args", "experiment=seedx_pretrain_tiny",
                         "--include_path", "assets/eval/lmms_eval", "--tasks", "seedx_sample_vqa", "--limit", "3",
                         "--log_samples", "--output_path", str(out), "--device", "cpu", "--batch_size", "1")
    log = (proc.stdout + proc.stderr)[-4000:]
    results = sorted(out.glob("**/*_results.json"))
    samples = sorted(out.glob("**/*_samples_seedx_sample_vqa.jsonl"))
    assert proc.returncode == 0 and len(results) == 1 and len(samples) == 1, log
    scores = json.loads(results[0].read_text())
    assert scores["config"]["model"] == "seedx" and scores["config"]["device"] == "cpu"
    assert scores["n-samples"]["seedx_sample_vqa"] == {"original": 4, "effective": 3}
    rows = [json.loads(ln) for ln in samples[0].read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1, 2]
    answers = [r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0] for r in rows]
    assert all(isinstance(a, str) and "<img" not in a for a in answers)
    exact = [r["exact_match"] for r in rows]
    assert scores["results"]["seedx_sample_vqa"]["exact_match,none"] == pytest.approx(sum(exact) / 3)

    # the same answers as the plugin gives in this process to the same documents (same tiny model, batch 1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("seedx_task_utils", ROOT / "assets/eval/lmms_eval/utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    docs = [json.loads(ln) for ln in (ROOT / "assets/eval/lmms_eval/seedx_sample_vqa.jsonl").read_text().splitlines()]
    model.task_dict["seedx_sample_vqa"] = {"test": dict(enumerate(docs))}
    monkeypatch.setattr(model, "batch_size_per_gpu", 1)
    reqs = [instance("generate_until", (task_utils.doc_to_text(d), {"max_new_tokens": 8, "until": ["\n"],
                                                                   "do_sample": False},
                                        task_utils.doc_to_visual, i, "seedx_sample_vqa", "test"), i)
            for i, d in enumerate(docs[:3])]
    assert model.generate_until(reqs) == [a.strip() for a in answers]
