"""Local scorers of the benchmarks SEED-X reports (paper Table 2), following VLMEvalKit's rules so our numbers and
its scorer agree on the same prediction file (no LLM judge: an answer no rule can read counts as wrong and is
counted in ``unparsed``).

* multiple choice (MMBench, SEED-Bench-2): :func:`extract_choice` reads the letter, like VLMEvalKit's
  ``can_infer``: exactly one option letter standing alone in the answer, else exactly one option's text in it.
* MMBench circular evaluation: rows whose ``index`` agree modulo 1e6 are rotations of one question (VLMEvalKit's
  circular copies); a question counts only when every rotation is answered right.
* MME: yes / no per question; per category ``acc`` (questions right) and ``acc+`` (images with both of their
  questions right), score = acc + acc+ (in %); perception and cognition are the sums of their categories.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from src.evaluation.vlmeval_tsv import options_of

CIRCULAR_MOD = 1_000_000
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

__all__ = ["BENCHMARKS", "Benchmark", "extract_choice", "extract_yes_no", "score_mmbench", "score_mme",
           "score_multiple_choice"]


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, or None when it names none or several."""
    text = answer.strip()
    tokens = re.findall(r"[A-Za-z]+", text)
    letters = {t for t in tokens if len(t) == 1 and t.isupper() and t in options}
    if len(letters) == 1:
        return letters.pop()
    if not letters:
        low = text.lower()
        hits = [k for k, v in options.items() if v.lower() in low]
        if len(hits) == 1:
            return hits[0]
    return None


def extract_yes_no(answer: str) -> str | None:
    words = set(re.findall(r"[a-z]+", answer.lower()))
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return None


def _pct(num: int, den: int) -> float:
    return 100.0 * num / den if den else 0.0


def score_multiple_choice(rows: list[dict], predictions: dict[str, str]) -> dict:
    """Accuracy overall and per ``category`` (SEED-Bench-2, or MMBench without circular evaluation)."""
    right: dict[str, list[bool]] = defaultdict(list)
    unparsed = 0
    for r in rows:
        choice = extract_choice(predictions.get(r["index"], ""), options_of(r))
        unparsed += choice is None
        right[r.get("category") or "all"].append(choice == r["answer"].strip())
    flat = [x for v in right.values() for x in v]
    return {"accuracy": _pct(sum(flat), len(flat)), "questions": len(flat), "unparsed": unparsed,
            "per_category": {k: _pct(sum(v), len(v)) for k, v in sorted(right.items())}}


def score_mmbench(rows: list[dict], predictions: dict[str, str]) -> dict:
    """MMBench circular accuracy (plus the plain per-row accuracy for reference)."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[int(float(r["index"])) % CIRCULAR_MOD].append(r)
    per_cat: dict[str, list[bool]] = defaultdict(list)
    unparsed = 0
    for members in groups.values():
        ok = True
        for r in members:
            choice = extract_choice(predictions.get(r["index"], ""), options_of(r))
            unparsed += choice is None
            ok &= choice == r["answer"].strip()
        per_cat[members[0].get("category") or "all"].append(ok)
    flat = [x for v in per_cat.values() for x in v]
    plain = score_multiple_choice(rows, predictions)["accuracy"]
    return {"circular_accuracy": _pct(sum(flat), len(flat)), "questions": len(flat), "rows": len(rows),
            "row_accuracy": plain, "unparsed": unparsed,
            "per_category": {k: _pct(sum(v), len(v)) for k, v in sorted(per_cat.items())}}


def score_mme(rows: list[dict], predictions: dict[str, str]) -> dict:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    by_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    unparsed = 0
    for r in rows:
        said = extract_yes_no(predictions.get(r["index"], ""))
        unparsed += said is None
        ok = said == r["answer"].strip().capitalize()
        cat = r["category"]
        by_cat[cat].append(ok)
        by_image[(cat, r.get("image_path") or r["index"])].append(ok)
    per: dict[str, dict[str, float]] = {}
    for cat, oks in sorted(by_cat.items()):
        images = [all(v) for (c, _), v in by_image.items() if c == cat]
        acc, acc_plus = _pct(sum(oks), len(oks)), _pct(sum(images), len(images))
        per[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {"perception": sum(v["score"] for k, v in per.items() if k in MME_PERCEPTION),
            "cognition": sum(v["score"] for k, v in per.items() if k in MME_COGNITION),
            "questions": len(rows), "unparsed": unparsed, "per_category": per}


@dataclass(frozen=True)
class Benchmark:
    """How a benchmark TSV is scored: its scorer, the score it is known by, the columns it needs."""

    score: Callable[[list[dict], dict[str, str]], dict]
    headline: str
    columns: tuple[str, ...]


BENCHMARKS: dict[str, Benchmark] = {
    "mmbench": Benchmark(score_mmbench, "circular_accuracy", ("image", "answer", "A", "B")),
    "mme": Benchmark(score_mme, "perception", ("image", "answer", "category")),
    "seedbench2": Benchmark(score_multiple_choice, "accuracy", ("image", "answer", "A", "B")),
}
