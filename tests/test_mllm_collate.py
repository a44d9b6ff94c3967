"""MLLM collate (padding vs packing, the view order invariant, bad batches) and the datamodule on assets/sample."""
from pathlib import Path

import pytest
import torch

from src.data.mllm_collate import MLLMCollator, pack_first_fit
from src.data.mllm_sequence import IGNORE_INDEX
from src.data.records import SkippedSample

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "sample"
S = 4
N = 64
PAD = 0


def fake_sample(idx: int, text_lens: list[int], views: list[str], truncated: bool = False) -> dict:
    """A builder-shaped sample: text runs and image spans alternate; view ``v`` of sample ``idx`` has uid
    ``idx * 10 + v`` stored in its pixels and in its 64 token ids (``uid * 1000 + j``)."""
    ids, labels, cmp, gen = [1], [IGNORE_INDEX], [False], [False]
    pixels, is_gen = [], []
    for k, n in enumerate(text_lens):
        ids += [500 + idx] * n
        labels += [500 + idx] * n
        cmp += [False] * n
        gen += [False] * n
        if k < len(views):
            uid = idx * 10 + k
            g = views[k] == "gen"
            ids += [7] + [uid * 1000 + j for j in range(N)] + [8]
            labels += [IGNORE_INDEX] * (N + 2)
            cmp += [False] + [not g] * N + [False]
            gen += [False] + [g] * N + [False]
            pixels.append(torch.full((3, S, S), float(uid)))
            is_gen.append(g)
    ids.append(2)
    labels.append(2)
    cmp.append(False)
    gen.append(False)
    flags = torch.tensor(is_gen, dtype=torch.bool)
    return {
        "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
        "ids_cmp_mask": torch.tensor(cmp), "ids_gen_mask": torch.tensor(gen),
        "vit_pixels": torch.stack(pixels) if pixels else torch.zeros(0, 3, S, S),
        "embeds_cmp_mask": ~flags, "embeds_gen_mask": flags,
        "patch_positions": torch.full((len(pixels), 2), 0.5),
        "id": f"s/{idx}", "source": "fake", "truncated": truncated,
    }


def samples():
    return [
        fake_sample(0, [3, 5], ["cmp"]),
        fake_sample(1, [10, 2, 4], ["gen", "cmp"], truncated=True),
        fake_sample(2, [7], []),
        fake_sample(3, [1, 1, 1], ["cmp", "gen"]),
        {"skipped": SkippedSample("corrupt_image", "fake", "s/x", "f:1")},
        fake_sample(5, [20, 3], ["cmp"]),
    ]


def assert_order_invariant(batch):
    """The k-th True of ids_cmp_mask (row-major) holds token k % 64 of the (k // 64)-th cmp view."""
    for mask_key, view_key in (("ids_cmp_mask", "embeds_cmp_mask"), ("ids_gen_mask", "embeds_gen_mask")):
        tokens = batch["input_ids"][batch[mask_key]]
        uids = batch["vit_pixels"][batch[view_key]][:, 0, 0, 0].long()
        assert tokens.numel() == N * uids.numel()
        expected = (uids[:, None] * 1000 + torch.arange(N)[None, :]).flatten()
        assert torch.equal(tokens, expected)


def unpack(batch, packing):
    """Per-sample (id, input_ids, labels) read back from the rows, walking batch["ids"] in order."""
    lengths = {s["id"]: len(s["input_ids"]) for s in samples() if "id" in s}
    queue, out = list(batch["ids"]), []
    rows, width = batch["input_ids"].shape
    for b in range(rows):
        at = 0
        while queue and at + lengths[queue[0]] <= width and batch["input_ids"][b, at] == 1:  # BOS
            n = lengths[queue[0]]
            if packing:
                assert batch["position_ids"][b, at:at + n].tolist() == list(range(n))
            out.append((queue.pop(0), batch["input_ids"][b, at:at + n], batch["labels"][b, at:at + n]))
            at += n
            if not packing:
                break
    assert not queue
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_collate_keeps_samples_and_order_invariant(packing):
    batch = MLLMCollator(PAD, max_length=200, packing=packing)(samples())
    assert batch["batch_size"] == 5 and len(batch["ids"]) == 5 and batch["sources"] == ["fake"] * 5
    assert [s.reason for s in batch["skipped"]] == ["corrupt_image"]
    # first-fit into rows of 200 tokens (lengths 76, 150, 9, 137, 91) reorders the samples
    assert batch["ids"] == (["s/0", "s/2", "s/5", "s/1", "s/3"] if packing else ["s/0", "s/1", "s/2", "s/3", "s/5"])
    assert batch["truncated"] == 1
    assert batch["num_tokens"] == sum(len(s["input_ids"]) for s in samples() if "id" in s)
    assert batch["vit_pixels"].shape == (6, 3, S, S)
    assert batch["patch_positions"].shape == (6, 2)
    assert batch["embeds_cmp_mask"].dtype == torch.bool and batch["ids_cmp_mask"].dtype == torch.bool
    assert bool((batch["embeds_cmp_mask"] ^ batch["embeds_gen_mask"]).all())
    assert_order_invariant(batch)
    by_id = {s["id"]: s for s in samples() if "id" in s}
    for sid, inp, lab in unpack(batch, packing):
        assert torch.equal(inp, by_id[sid]["input_ids"]) and torch.equal(lab, by_id[sid]["labels"])
    # views come in the same sample order as ids
    owners = [int(u) // 10 for u in batch["vit_pixels"][:, 0, 0, 0].tolist()]
    assert owners == sorted(owners, key=lambda o: batch["ids"].index(f"s/{o}"))


def test_padding_mode_layout():
    good = [s for s in samples() if "id" in s]
    batch = MLLMCollator(PAD, max_length=200)(samples())
    width = max(len(s["input_ids"]) for s in good)
    assert batch["input_ids"].shape == (5, width)
    assert batch["ids"] == [s["id"] for s in good]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [len(s["input_ids"]) for s in good]
    assert (batch["position_ids"] == torch.arange(width)).all()
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == PAD).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    assert not (batch["ids_cmp_mask"][pad] | batch["ids_gen_mask"][pad]).any()


def test_packing_mode_layout():
    good = [s for s in samples() if "id" in s]
    lengths = [len(s["input_ids"]) for s in good]
    rows = pack_first_fit(lengths, 160)
    batch = MLLMCollator(PAD, max_length=160, packing=True)(samples())
    assert batch["attention_mask"] is None
    assert batch["input_ids"].shape[0] == len(rows) < len(good)
    assert batch["ids"] == [good[i]["id"] for row in rows for i in row]
    width = batch["input_ids"].shape[1]
    assert width == max(sum(lengths[i] for i in row) for row in rows) <= 160
    for b, row in enumerate(rows):
        starts = [0]
        for i in row:
            starts.append(starts[-1] + lengths[i])
        pos = batch["position_ids"][b]
        zeros = torch.nonzero(pos == 0).flatten().tolist()
        assert zeros == (starts if starts[-1] < width else starts[:-1])  # each sample + the pad tail restart
        tail = slice(starts[-1], width)
        assert (batch["input_ids"][b, tail] == PAD).all() and (batch["labels"][b, tail] == IGNORE_INDEX).all()
        assert pos[tail].tolist() == list(range(width - starts[-1]))


def test_pack_first_fit():
    assert pack_first_fit([5, 7, 3, 6], 10) == [[0, 2], [1], [3]]
    assert pack_first_fit([], 10) == []
    with pytest.raises(ValueError):
        pack_first_fit([11], 10)


@pytest.mark.parametrize("packing", [False, True])
def test_all_bad_batch_and_no_images(packing):
    collate = MLLMCollator(PAD, max_length=64, packing=packing, vit_image_size=S)
    bad = collate([{"skipped": SkippedSample("missing_file", "x", "a", "f:1")}])
    assert bad["batch_size"] == 0 and bad["num_tokens"] == 0 and len(bad["skipped"]) == 1
    assert bad["input_ids"].shape == (0, 0) and bad["vit_pixels"].shape == (0, 3, S, S)
    assert bad["embeds_cmp_mask"].shape == (0,) and bad["patch_positions"].shape == (0, 2)
    text_only = collate([fake_sample(0, [3], []), fake_sample(1, [5], [])])
    assert text_only["batch_size"] == 2 and text_only["vit_pixels"].shape == (0, 3, S, S)
    assert not text_only["ids_cmp_mask"].any()


def test_over_long_sample_is_skipped_not_raised():
    batch = MLLMCollator(PAD, max_length=20)([fake_sample(0, [3], ["cmp"]), fake_sample(1, [3], [])])
    assert batch["batch_size"] == 1 and batch["skipped"][0].reason == "too_long"
    assert batch["vit_pixels"].shape[0] == 0


# ------------------------------------------------------------------------------------------- datamodule
def test_datamodule_on_sample_data():
    from src.data.mllm import MLLMDataModule

    dm = MLLMDataModule(
        tokenizer_path=str(ROOT / "assets" / "tokenizers" / "tiny-llama"),
        train_sources=[{"path": str(SAMPLE / "captions.jsonl"), "kind": "jsonl", "weight": 3.0},
                       {"path": str(SAMPLE / "edit.jsonl"), "kind": "jsonl", "weight": 1.0, "name": "edit"}],
        val_sources=[{"path": str(SAMPLE / "captions.jsonl"), "kind": "jsonl"},
                     {"path": str(SAMPLE / "images_only.jsonl"), "kind": "jsonl"}],
        vit_image_size=28, max_length=1024, packing=True, batch_size=5, t2i_ratio=0.5, seed=1,
    )
    dm.setup("fit")
    assert len(dm.tokenizer) == 1330 and dm.tokenizer.pad_token_id is not None
    assert len(dm.train_sampler) == 20  # samples_per_epoch defaults to the sum of the sizes

    seen, skipped = 0, []
    for batch in dm.train_dataloader():
        seen += batch["batch_size"] + len(batch["skipped"])
        skipped += batch["skipped"]
        assert batch["attention_mask"] is None and batch["input_ids"].shape[1] <= 1024
        assert batch["vit_pixels"].shape[0] == batch["embeds_cmp_mask"].shape[0]
        assert int(batch["ids_cmp_mask"].sum()) == N * int(batch["embeds_cmp_mask"].sum())
        assert int(batch["ids_gen_mask"].sum()) == N * int(batch["embeds_gen_mask"].sum())
    assert seen == 20
    assert {s.id for s in skipped} <= {"sample_captions/corrupt", "sample_captions/missing"}

    reasons = []
    n_good = 0
    for batch in dm.val_dataloader():
        reasons += [s.reason for s in batch["skipped"]]
        n_good += batch["batch_size"]
        assert batch["attention_mask"] is None or batch["attention_mask"].shape == batch["input_ids"].shape
    assert sorted(reasons) == ["corrupt_image", "corrupt_image", "missing_file", "missing_file"]
    assert n_good == 20


def test_datamodule_config_errors(tmp_path):
    from src.data.mllm import MLLMDataModule

    src = [{"path": str(SAMPLE / "captions.jsonl"), "kind": "jsonl"}]
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path"):
        MLLMDataModule(tokenizer_path=str(tmp_path / "nope"), train_sources=src).setup("fit")
    with pytest.raises(ValueError, match="shards"):
        MLLMDataModule(tokenizer_path="x", train_sources=[{"path": "a.tar", "kind": "shards"}])
    with pytest.raises(ValueError, match="weight"):
        MLLMDataModule(tokenizer_path="x", train_sources=[{"path": "a.jsonl", "weight": -1}])
