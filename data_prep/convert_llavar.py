"""LLaVAR (text-rich image instruction data, LLaVA conversation format) -> user/assistant chat records.

    python -m data_prep.convert_llavar --input llava_instruct_150k_llavar_16k.json \\
        --image-root llavar_images/ --out data/llavar

The LLaVA-format converter (``data_prep/convert_llava.py``, whose docstring has the format and the skips)
with LLaVAR's default name; the same format covers LLaVAR's pretraining captions.
"""

from __future__ import annotations

from functools import partial

from data_prep import convert_llava
from data_prep.convert_llava import conversation_turns  # noqa: F401 - part of this module's API

DEFAULT_NAME = "llavar"
convert = partial(convert_llava.convert, name=DEFAULT_NAME)


def main(argv: list[str] | None = None) -> dict:
    return convert_llava.main(argv, DEFAULT_NAME, __doc__)


if __name__ == "__main__":
    main()
