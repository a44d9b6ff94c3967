"""The bundled lmms-eval task `seedx_sample_vqa`: yes/no questions about the sample photos (assets/sample/images).

lmms-eval imports this file by path (`!function utils.*` in the yaml, found through `--include_path`); it needs
nothing of ours, so any model lmms-eval knows can run the task.
"""

from pathlib import Path

from PIL import Image

IMAGES = Path(__file__).resolve().parents[2] / "sample" / "images"
POST_PROMPT = " Please answer yes or no."


def doc_to_visual(doc):
    return [Image.open(IMAGES / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + POST_PROMPT


def process_results(doc, results):
    """Exact match on the first word, case-insensitive (MME's yes/no reading without its extra rules)."""
    words = results[0].strip().lower().replace(".", " ").replace(",", " ").split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"].lower())}
