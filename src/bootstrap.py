"""The process environment every `python -m src.<entry>` sets before anything else is imported.

Imported first by each entry point (`import src.bootstrap  # noqa: F401`), never by library code: it only fills
variables the user has not set, and it must run before transformers, tokenizers or wandb read them.

- WANDB_MODE=offline: W&B never needs a login unless the user opts in (WANDB_MODE=online);
- TOKENIZERS_PARALLELISM=false: the Rust tokenizers' threads would deadlock in forked DataLoader workers;
- PROJECT_ROOT: the repo root, which conf/paths/default.yaml resolves every relative path against.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "PROJECT_ROOT": str(ROOT),
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
