"""src.bench_gpu (make bench-gpu): guarded parts, the report, and the CPU dry run of the whole script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.bench_gpu import expected_parts, guarded, markdown_table

ROOT = Path(__file__).resolve().parents[1]

FINITE_KEYS = ("loss_first", "loss_last", "step_s", "tokens_per_s", "images_per_s")


def test_a_failing_part_is_a_row_and_the_next_still_runs():
    rows: list[dict] = []
    cpu = torch.device("cpu")
    guarded(rows, "boom", lambda: 1 / 0, deadline=float("inf"), device=cpu)
    guarded(rows, "fine", lambda: {"tokens_per_s": 3.0}, deadline=float("inf"), device=cpu)
    guarded(rows, "late", lambda: {"tokens_per_s": 1.0}, deadline=0.0, device=cpu)
    assert [(r["part"], r["status"]) for r in rows] == [("boom", "failed"), ("fine", "ok"), ("late", "skipped")]
    assert rows[0]["error"].startswith("ZeroDivisionError") and rows[0]["oom"] is False
    assert rows[1]["tokens_per_s"] == 3.0 and "error" not in rows[1]
    table = markdown_table({"rows": rows, "device": "cpu", "size": "tiny", "torch": "x", "wall_s": 1.0})
    assert "| boom | failed |" in table and "| fine | ok | n/a | 3 |" in table and "time budget" in table


def test_every_part_is_named_for_both_sizes():
    for size, detok in (("full", "detok_step/sdxl"), ("tiny", "detok_step/tiny")):
        parts = expected_parts(size)
        assert detok in parts and len(parts) == len(set(parts))
        assert {"train/detok_stage1", "train/detok_stage2", "train/mllm_pretrain", "train/sft_edit",
                "train/seed_tokenizer_stage2", "train/seed_llama", "generate/t2i", "generate/chat",
                "mllm_step/1b/ckpt", "mllm_step/1b/no_ckpt", "mllm_step/1b/ckpt_compile",
                "mllm_step/13b/ckpt", "mllm_step/13b/no_ckpt", "decode/b1", "decode/b8"} <= set(parts)


@pytest.mark.slow
def test_cpu_dry_run_writes_every_row_and_tiny_rows_are_finite(tmp_path):
    # its own process, as `make bench-gpu` runs it: the one-rank FSDP2 parts set distributed environment
    # variables (MASTER_PORT, WORLD_SIZE, ...) and a process group that must not leak into later tests
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "src.bench_gpu", "--device", "cpu", "--size", "tiny", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--warmup", "1", "--steps", "1", "--train-steps", "2",
                           "--budget-s", "1e9"],  # no budget on CPU: a loaded machine must not skip parts
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    saved = json.loads((out / "bench_gpu.json").read_text())
    rows = {r["part"]: r for r in saved["rows"]}
    assert list(rows) == expected_parts("tiny")
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("error"))
        for key in FINITE_KEYS:
            if key in r:
                assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
    for name in (p for p in rows if p.startswith("train/")):
        assert rows[name]["finite"] and rows[name]["steps"] == 2
    assert rows["generate/t2i"]["images"] == 1
    # EOS never stops a row: at least new_tokens each (an image the model opens adds its forced tokens)
    assert rows["decode/b8"]["tokens"] >= 8 * rows["decode/b8"]["new_tokens"]
    table = (out / "bench_gpu.md").read_text()
    assert all(f"| {p} | ok |" in table for p in rows)
    assert printed.rstrip().splitlines()[-1].startswith("device=cpu")  # the table is printed last
    assert sorted(p.name for p in out.iterdir()) == ["bench_gpu.json", "bench_gpu.md"]


def test_13b_proxy_halves_its_layers_on_out_of_memory_and_keeps_them(tmp_path, monkeypatch):
    import src.bench_gpu as bg

    calls = []

    def fake_step(bench_size, variant, device, out, warmup, steps, layers=None):
        calls.append((bench_size, variant, layers))
        if layers is not None and layers > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"llm_layers": layers, "tokens_per_s": 1.0}

    monkeypatch.setattr(bg, "mllm_step", fake_step)
    result = bg.run(tmp_path, device="cpu", size="full", parts="mllm_step", thirteen_b_layers=20)
    rows = {r["part"]: r for r in result["rows"]}
    assert list(rows) == [p for p in expected_parts("full") if p.startswith("mllm_step/")]
    assert all(r["status"] == "ok" for r in rows.values())
    assert [c[2] for c in calls if c[0] == "13b_proxy"] == [20, 10, 5, 5, 5]  # found once, kept after
    assert rows["mllm_step/13b/no_ckpt"]["llm_layers"] == 5 and rows["mllm_step/1b/ckpt"]["llm_layers"] is None
