"""Local benchmark scoring: hand-computed scores on the tiny fixtures (MMBench circular, MME acc+, SEED-Bench-2),
answer extraction, VLMEvalKit TSV round trips, and `python -m src.eval` on the tiny twin."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from src.evaluation.scorers import (
    extract_choice,
    extract_yes_no,
    score_mmbench,
    score_mme,
    score_multiple_choice,
)
from src.evaluation.vlmeval_tsv import decode_image, options_of, read_tsv, write_predictions
from tests.helpers import compose_cfg, tiny_run_cfg, wandb_records

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "assets" / "eval"


def right_letter(row: dict) -> str:
    return row["answer"]


def wrong_letter(row: dict) -> str:
    return next(k for k in options_of(row) if k != row["answer"])


def test_fixtures_are_what_make_eval_fixtures_builds(tmp_path):
    from data_prep.make_eval_fixtures import build

    build(tmp_path)
    for name in ("mmbench.tsv", "mme.tsv", "seedbench2.tsv"):
        assert (tmp_path / name).read_bytes() == (EVAL / name).read_bytes(), name


def test_tsv_rows_resolve_image_references_and_decode():
    rows = read_tsv(EVAL / "mmbench.tsv")
    assert len(rows) == 12
    by_index = {r["index"]: r for r in rows}
    assert by_index["1000000"]["image"] == by_index["0"]["image"]  # a circular copy's image is a reference
    assert decode_image(by_index["2000001"]).size == Image.open(ROOT / "assets/sample/images/coffee.jpg").size


def test_choice_and_yes_no_extraction_follow_vlmevalkit_rules():
    opts = {"A": "a cat", "B": "a dog", "C": "a rabbit"}
    assert extract_choice("B", opts) == "B"
    assert extract_choice("The answer is (C).", opts) == "C"
    assert extract_choice("It is a dog.", opts) == "B"  # no letter: the one option whose text it contains
    assert extract_choice("A or B", opts) is None  # two letters: unreadable, counted wrong
    assert extract_choice("I see a cat and a dog", opts) is None
    assert extract_choice("D", opts) is None  # not an option
    assert extract_yes_no("Yes, there is.") == "Yes" and extract_yes_no("no") == "No"
    assert extract_yes_no("yes and no") is None


def test_mmbench_circular_counts_a_question_only_when_every_rotation_is_right():
    rows = read_tsv(EVAL / "mmbench.tsv")
    preds = {r["index"]: right_letter(r) for r in rows}
    assert score_mmbench(rows, preds)["circular_accuracy"] == 100.0
    # question 0: right on 3 of its 4 rotations -> 0 for that question; questions 1, 2 all right
    preds[next(r["index"] for r in rows if r["index"] == "3000000")] = wrong_letter(
        next(r for r in rows if r["index"] == "3000000"))
    s = score_mmbench(rows, preds)
    assert s["circular_accuracy"] == pytest.approx(200 / 3)
    assert s["row_accuracy"] == pytest.approx(100 * 11 / 12)
    assert s["per_category"] == {"object_recognition": 50.0, "scene_understanding": 100.0}
    # answers given as option text score the same as letters
    text = {r["index"]: options_of(r)[r["answer"]] for r in rows}
    assert score_mmbench(rows, text)["circular_accuracy"] == 100.0


def test_mme_acc_plus_needs_both_questions_of_an_image_right():
    rows = read_tsv(EVAL / "mme.tsv")
    preds = {r["index"]: r["answer"] for r in rows}
    full = score_mme(rows, preds)
    assert full["perception"] == 400.0 and full["cognition"] == 200.0  # 2 perception categories x (100 + 100)
    # existence: one image gets one of its two questions wrong -> acc 75, acc+ 50
    first = next(r for r in rows if r["category"] == "existence")
    preds[first["index"]] = "No" if first["answer"] == "Yes" else "Yes"
    # count: both answers unreadable on one image
    for r in [r for r in rows if r["image_path"] == "count/coins.jpg"]:
        preds[r["index"]] = "maybe"
    s = score_mme(rows, preds)
    assert s["per_category"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert s["per_category"]["count"] == {"acc": 50.0, "acc_plus": 50.0, "score": 100.0}
    assert s["perception"] == 225.0 and s["cognition"] == 200.0 and s["unparsed"] == 2


def test_seedbench2_accuracy_per_category():
    rows = read_tsv(EVAL / "seedbench2.tsv")
    preds = {r["index"]: right_letter(r) for r in rows}
    preds["3"] = f"The answer is {wrong_letter(rows[3])}."
    s = score_multiple_choice(rows, preds)
    assert s["accuracy"] == 75.0
    assert s["per_category"] == {"Instance Attributes": 100.0, "Instance Identity": 50.0}


def test_prediction_file_keeps_the_rows_without_images(tmp_path):
    rows = read_tsv(EVAL / "seedbench2.tsv")
    path = write_predictions(rows, {r["index"]: "A" for r in rows}, tmp_path / "m_seedbench2.tsv")
    with path.open() as f:
        back = list(csv.DictReader(f, delimiter="\t"))
    assert [r["prediction"] for r in back] == ["A"] * 4 and "image" not in back[0]
    assert [r["answer"] for r in back] == [r["answer"] for r in rows]


def test_a_bad_benchmark_file_fails_naming_the_problem(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\timage\n0\tq\t7\n")
    with pytest.raises(ValueError, match="refers to the image of row '7'"):
        read_tsv(bad)
    with pytest.raises(FileNotFoundError, match="benchmark file"):
        read_tsv(tmp_path / "absent.tsv")


@pytest.mark.smoke
@pytest.mark.parametrize("task", ["mmbench", "mme", "seedbench2"])
def test_src_eval_writes_eval_json_md_and_predictions_on_the_tiny_twin(task, tmp_path):
    from omegaconf import OmegaConf

    from src.eval import evaluate

    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path, [f"task={task}", "logger=wandb", "batch_size=4"],
                      config_name="eval")
    OmegaConf.resolve(cfg)
    result = evaluate(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["task"] == task and saved["headline"] == result["headline"]
    assert (tmp_path / "eval.md").read_text().startswith(f"# {task}")
    rows = read_tsv(EVAL / f"{task}.tsv")
    with open(saved["predictions"]) as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == len(rows)
    tables = list((tmp_path / "wandb").rglob("*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"][:2] == ["index", "image"]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    staged = [c.path for a in records["artifact"] for c in a.manifest.contents]
    assert any(p.startswith("media/images/") for p in staged)  # the table's images travel in its artifact
    logged = {i.key or "/".join(i.nested_key) for h in records["history"] for i in h.item}
    assert f"eval/{task}/questions" in logged


def test_question_prompts_list_the_options_as_vlmevalkit_does():
    from src.pipelines.benchmark import MC_INSTRUCTION, question_text, request_of

    row = read_tsv(EVAL / "seedbench2.tsv")[0]
    text = question_text("seedbench2", row)
    assert text.splitlines() == [row["question"], "A. a spacesuit", "B. a swimsuit", "C. a lab coat",
                                 "D. a wedding dress", MC_INSTRUCTION]
    req = request_of("seedbench2", row)
    assert Image.open(io.BytesIO(req["_blobs"]["img0"])).size == decode_image(row).size
    assert base64.b64encode(req["_blobs"]["img0"]).decode() == row["image"]
    assert req["turns"][0]["content"][0] == {"image": "img0"}


@pytest.mark.smoke
def test_the_eval_callback_scores_the_benchmark_during_training(tmp_path):
    from src.train import train

    metrics, _ = train(tiny_run_cfg("seedx_sft_i_tiny", tmp_path, [
        "trainer.max_steps=2", "callbacks.eval_benchmark.every_n_steps=2", "callbacks.eval_benchmark.task=mme",
        f"callbacks.eval_benchmark.path={EVAL / 'mme.tsv'}", "callbacks.sft_samples.every_n_steps=0"]))
    (line,) = (tmp_path / "eval" / "mme.jsonl").read_text().splitlines()
    run = json.loads(line)
    assert run["step"] == 2 and len(run["answers"]) == 12 and run["scores"]["questions"] == 12
    assert metrics["eval/mme/perception"] == run["scores"]["perception"]


def test_fid_of_a_folder_against_itself_is_zero_and_grows_when_perturbed():
    from PIL import ImageFilter

    from src.evaluation.image_metrics import FeatureNets, fid

    photos = [Image.open(ROOT / "assets/sample/images" / f"{n}.jpg") for n in
              ("chelsea", "coffee", "rocket", "astronaut", "coins", "camera")]
    nets = FeatureNets(tiny=True, tokenizer_path=str(ROOT / "assets/tokenizers/tiny-llama"))
    assert abs(fid(nets, photos, photos)) < 1e-6
    blurred = fid(nets, [p.filter(ImageFilter.GaussianBlur(3)) for p in photos], photos)
    noisier = fid(nets, [p.filter(ImageFilter.GaussianBlur(8)) for p in photos], photos)
    assert 0 < blurred < noisier


def test_editing_metrics_are_perfect_on_identical_images_and_a_missing_network_names_its_key():
    from PIL import ImageOps

    from src.evaluation.image_metrics import FeatureNets, clip_i, dino_similarity, l1_distance

    photos = [Image.open(ROOT / "assets/sample/images" / f"{n}.jpg") for n in ("chelsea", "coffee")]
    nets = FeatureNets(tiny=True, tokenizer_path=str(ROOT / "assets/tokenizers/tiny-llama"))
    assert l1_distance(photos, photos) == 0.0
    assert clip_i(nets, photos, photos) == pytest.approx(1.0, abs=1e-5)
    assert dino_similarity(nets, photos, photos) == pytest.approx(1.0, abs=1e-5)
    inverted = [ImageOps.invert(p.convert("RGB")) for p in photos]
    assert l1_distance(inverted, photos) > 0.2 and dino_similarity(nets, inverted, photos) < 1.0
    with pytest.raises(FileNotFoundError, match="metrics.clip_path: needs a local CLIP folder"):
        clip_i(FeatureNets(), photos, photos)
    with pytest.raises(FileNotFoundError, match="metrics.fid_weights"):
        FeatureNets(fid_weights="/nope.pth").fid_metric()


@pytest.mark.smoke
@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_src_eval_image_tasks_draw_and_score_on_the_tiny_twin(task, tmp_path):
    from omegaconf import OmegaConf

    from src.eval import evaluate

    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path, [f"task={task}", "logger=csv", "sampling.steps=2",
                                                        "batch_size=8"], config_name="eval")
    OmegaConf.resolve(cfg)
    result = evaluate(cfg)
    scores = json.loads((tmp_path / "eval.json").read_text())["scores"]
    assert scores == result["scores"] and scores["drawn"] == scores["samples"] > 0 and scores["tiny_metric_networks"]
    keys = {"t2i": ("clip_score", "fid"), "edit": ("l1", "clip_i", "dino")}[task]
    assert all(k in scores and scores[k] == scores[k] for k in keys)  # present and not NaN
    assert len(list((tmp_path / "images").glob("*.png"))) == scores["drawn"]
    assert "| " + keys[0] + " |" in (tmp_path / "eval.md").read_text()


def test_src_eval_scores_a_folder_of_outputs_without_building_a_model(tmp_path):
    from omegaconf import OmegaConf

    from src.eval import evaluate

    rows = read_tsv(EVAL / "edit.tsv")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for r in rows[:5]:  # perfect edits for 5 of the 8 rows: the targets themselves
        decode_image({"index": r["index"], "image": r["target"]}).save(outputs / f"{r['index']}.png")
    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path / "run", ["task=edit", "logger=csv", f"outputs={outputs}"],
                      config_name="eval")
    OmegaConf.resolve(cfg)
    scores = evaluate(cfg)["scores"]
    assert scores["drawn"] == 5 and scores["samples"] == 8
    assert scores["l1"] == pytest.approx(0.0, abs=1e-6) and scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scores["dino"] == pytest.approx(1.0, abs=1e-5)


def test_a_benchmark_file_without_the_tasks_columns_fails_before_any_model_is_built(tmp_path):
    from omegaconf import OmegaConf

    from src.eval import evaluate

    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path, ["task=edit", "logger=csv", f"data.path={EVAL / 't2i.tsv'}"],
                      config_name="eval")
    OmegaConf.resolve(cfg)
    with pytest.raises(ValueError, match=r"task=edit needs the columns \['target'\]"):
        evaluate(cfg)


@pytest.mark.slow
def test_the_eval_cli_writes_eval_json_and_md(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "src.eval", "experiment=seedx_pretrain_tiny", "task=mme",
                          f"paths.output_dir={tmp_path}", "logger=csv"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())["task"] == "mme"
    assert "perception" in (tmp_path / "eval.md").read_text()
