"""The record schema (documented in ``src/data/records.py``): validation of a record and of a chat, and the
accessors every builder uses (its images, its text)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from src.data.skips import BadSample

ROLES = (None, "user", "assistant", "system")
ITEM_KINDS = ("text", "image", "box")
_GRID = re.compile(r"^(any|[1-9][0-9]*x[1-9][0-9]*)$")

__all__ = ["CHAT_CONTROL_TEXT", "ITEM_KINDS", "ROLES", "record_images", "record_text", "validate_chat",
           "validate_record"]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_item(item: Any, at: str) -> None:
    if not isinstance(item, dict):
        raise BadSample("bad_schema", f"{at} must be an object, got {type(item).__name__}")
    kinds = [k for k in ITEM_KINDS if k in item]
    if len(kinds) != 1:
        raise BadSample("bad_schema", f"{at} must have exactly one of 'text', 'image', 'box'; "
                                      f"has {kinds or 'none'} (keys {sorted(item)})")
    kind = kinds[0]
    value = item[kind]
    if kind == "text":
        if not isinstance(value, str):
            raise BadSample("bad_schema", f"{at}.text must be a string, got {type(value).__name__}")
        if not value.strip():
            raise BadSample("empty_text", f"{at}.text is empty")
    elif kind == "image":
        if not isinstance(value, str) or not value.strip():
            raise BadSample("bad_schema", f"{at}.image must be a non-empty string, got {value!r}")
        if "generate" in item and not isinstance(item["generate"], bool):
            raise BadSample("bad_schema", f"{at}.generate must be true/false, got {item['generate']!r}")
        if "grid" in item and not (isinstance(item["grid"], str) and _GRID.match(item["grid"])):
            raise BadSample("bad_schema", f"{at}.grid must be 'any' or 'RxC' (e.g. '1x1'), got {item['grid']!r}")
    else:  # box
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
            raise BadSample("bad_schema", f"{at}.box must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
        x0, y0, x1, y1 = value
        if min(value) < 0 or x1 < x0 or y1 < y0:
            raise BadSample("bad_schema", f"{at}.box must satisfy 0 <= x0 <= x1 and 0 <= y0 <= y1, got {value!r}")
        if "label" in item and not isinstance(item["label"], str):
            raise BadSample("bad_schema", f"{at}.label must be a string, got {type(item['label']).__name__}")
        canvas = item.get("canvas")
        if canvas is not None and not (isinstance(canvas, (list, tuple)) and len(canvas) == 2
                                       and all(_is_number(v) and v > 0 for v in canvas)):
            raise BadSample("bad_schema", f"{at}.canvas must be [width, height] > 0, got {canvas!r}")


def validate_record(obj: Any) -> dict:
    """Check ``obj`` against the record schema and return it unchanged.

    Raises ``BadSample("bad_schema", ...)`` naming the offending field (``turns[1].content[0].image ...``),
    or ``BadSample("empty_text", ...)`` for a text item that is blank after stripping. Keys starting with
    ``_`` and unknown extra keys are allowed (readers' private data, dataset metadata).
    """
    if not isinstance(obj, dict):
        raise BadSample("bad_schema", f"record must be a JSON object, got {type(obj).__name__}")
    for key in ("id", "source"):
        if key not in obj:
            raise BadSample("bad_schema", f"missing '{key}'")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise BadSample("bad_schema", f"'{key}' must be a non-empty string, got {obj[key]!r}")
    if "turns" not in obj:
        raise BadSample("bad_schema", "missing 'turns'")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_schema", f"'turns' must be a non-empty list, got {turns!r:.80}")
    for i, turn in enumerate(turns):
        at = f"turns[{i}]"
        if not isinstance(turn, dict):
            raise BadSample("bad_schema", f"{at} must be an object, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise BadSample("bad_schema", f"{at}.role must be null, 'user', 'assistant' or 'system'; got {role!r}")
        content = turn.get("content")
        if not isinstance(content, list) or not content:
            raise BadSample("bad_schema", f"{at}.content must be a non-empty list, got {content!r:.80}")
        for j, item in enumerate(content):
            _validate_item(item, f"{at}.content[{j}]")
    return obj


# Text that the chat templates use to mark turns (SEED-X's Llama-2 `[INST] ... [/INST]`, `<<SYS>>`, the
# sequence marks `<s>` / `</s>`, SEED-LLaMA's `USER:` / `ASSISTANT:`): inside a turn's content it would
# forge turn boundaries the model then learns word for word.
CHAT_CONTROL_TEXT: tuple[str, ...] = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", "USER:", "ASSISTANT:")


def validate_chat(obj: dict, control_text: Iterable[str] = CHAT_CONTROL_TEXT) -> dict:
    """Check the turns of a chat (a record with user / assistant turns; documents pass) and return it.

    ``bad_turn_order``: a system turn after the first turn, an assistant turn before any user turn, two user
    turns in a row, or no assistant turn at all (nothing to learn); ``control_text_in_chat``: a text item
    holding the templates' own turn markers (:data:`CHAT_CONTROL_TEXT`). The same rules as torchtune's
    message validation and the Llama reference chat code. Training readers apply it (generation prompts
    are user-only chats by nature and are validated with :func:`validate_record` alone)."""
    roles = [turn.get("role") for turn in obj["turns"]]
    if not any(r in ("user", "assistant") for r in roles):
        return obj
    previous = None
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            raise BadSample("bad_turn_order", f"turns[{i}] is a system turn; only the first turn may be one")
        if role == "assistant" and "user" not in roles[:i]:
            raise BadSample("bad_turn_order", f"turns[{i}] is an assistant turn before any user turn")
        if role == "user" and previous == "user":
            raise BadSample("bad_turn_order", f"turns[{i - 1}] and turns[{i}] are two user turns in a row")
        previous = role
    if "assistant" not in roles:
        raise BadSample("bad_turn_order", "a chat with no assistant turn (nothing to learn)")
    marks = tuple(control_text)
    for i, turn in enumerate(obj["turns"]):
        for j, item in enumerate(turn["content"]):
            found = next((m for m in marks if m in item.get("text", "")), None)
            if found:
                raise BadSample("control_text_in_chat", f"turns[{i}].content[{j}].text contains the chat "
                                                        f"template's control text {found!r}")
    return obj


def record_images(record: dict) -> list[dict]:
    """All image items of a record, in order."""
    return [item for turn in record["turns"] for item in turn["content"] if "image" in item]


def record_text(record: dict, sep: str = "\n") -> str:
    """All text items of a record joined with ``sep``."""
    return sep.join(item["text"] for turn in record["turns"] for item in turn["content"] if "text" in item)


def _str_or_none(obj: Any, key: str) -> str | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value else None
