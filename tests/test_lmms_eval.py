"""The lmms-eval adapter (src/lmms.py): found through lmms-eval's plugin entry points, loads a tiny model and
answers a generate_until and a loglikelihood request. Needs the [eval] extra (make setup installs it)."""

from __future__ import annotations

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
