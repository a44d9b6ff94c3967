"""Benchmark questions (rows of a VLMEvalKit TSV) asked to the MLLM: the prompt VLMEvalKit uses, greedy answers.

Shared by `python -m src.eval` and the training-time eval callback (src/callbacks/eval_benchmark.py).
"""

from __future__ import annotations

import base64

from src.evaluation.vlmeval_tsv import options_of
from src.pipelines.mllm import DecodingOptions, MLLMGenerator
from src.utils.progress import progress_bar

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# tasks whose `question` is the whole prompt (no lettered options)
FREE_FORM = ("mme", "t2i", "edit")


def question_text(task: str, row: dict) -> str:
    """The benchmark's question as VLMEvalKit prompts it: hint, question, lettered options, the instruction."""
    if task in FREE_FORM:
        return row["question"].strip()
    parts = []
    hint = (row.get("hint") or "").strip()
    if hint and hint.lower() != "nan":
        parts.append(hint)
    parts.append(row["question"].strip())
    parts += [f"{k}. {v}" for k, v in options_of(row).items()]
    parts.append(MC_INSTRUCTION)
    return "\n".join(parts)


def image_question(rid: str, source: str, images: list[bytes], text: str) -> dict:
    """A one-turn request record of the data schema: the images (carried as bytes, as shard records are), then
    the question."""
    blobs = {f"img{k}": data for k, data in enumerate(images)}
    content = [{"image": name} for name in blobs] + [{"text": text}]
    return {"id": rid, "source": source, "_where": rid, "_blobs": blobs, "turns": [{"role": "user", "content": content}]}


def request_of(task: str, row: dict) -> dict:
    """One benchmark row as a request record."""
    return image_question(f"{task}/{row['index']}", task, [base64.b64decode(row["image"])], question_text(task, row))


def answer_questions(generator: MLLMGenerator, builder, task: str, rows: list[dict], batch_size: int,
                     max_new_tokens: int, show_progress: bool = False) -> dict[str, str]:
    """{row index: the model's answer text}, greedy, `batch_size` questions at a time. `show_progress`: a bar of
    questions answered (src.eval; off for the training-time callback, under Lightning's own bar)."""
    options = DecodingOptions(max_new_tokens=max_new_tokens, image="free")
    out: dict[str, str] = {}
    bar = progress_bar(f"{task}: answering", total=len(rows), unit="question") if show_progress else None
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        samples = [builder.prompt(request_of(task, r)) for r in chunk]
        for r, g in zip(chunk, generator.generate(samples, options)):
            out[r["index"]] = generator.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix({"answered": len(out), "empty": sum(not a for a in out.values())}, refresh=False)
    if bar is not None:
        bar.close()
    return out
