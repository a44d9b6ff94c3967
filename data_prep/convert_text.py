"""Plain-text corpora -> text-only documents (one null-role turn with one text item).

    python -m data_prep.convert_text --input corpus/*.txt wiki.jsonl.gz --out data/text --min-chars 200

Input files (plain, ``.gz``, or ``.zip`` with such members):

* ``.txt``: documents are blocks separated by one or more blank lines (whitespace-only lines count as
  blank); line breaks inside a block are kept;
* ``.jsonl`` (or C4's ``.json.gz``): one JSON object a line, the document in ``--text-field`` (default ``text``; dotted for nested
  keys), e.g. C4, RedPajama, Wikipedia dumps.

Text is stripped; documents shorter than ``--min-chars`` characters (default 20) are skipped.
Record id: ``<source>/<file stem>-<n>``, ``n`` = the document's number in its file from 0 (skipped ones
count too; in a .jsonl the n-th non-blank line).
Skips: ``too_short``, ``missing_text`` (field absent / not a string / blank), ``bad_json``, ``bad_file``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.common import (
    RecordWriter,
    converter_parser,
    expand_inputs,
    field_value,
    file_stem,
    iter_rows,
    open_text_streams,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "text"


def txt_documents(path: Path) -> Iterator[tuple[str, str | BadSample]]:
    """(where, text) for each blank-line-separated block of a text file; where = ``file:first line``."""
    label, lineno = str(path), 0
    try:
        for label, stream in open_text_streams(path):
            block: list[str] = []
            start = lineno = 0
            for lineno, line in enumerate(stream, 1):
                if line.strip():
                    if not block:
                        start = lineno
                    block.append(line.rstrip("\r\n"))
                elif block:
                    yield f"{label}:{start}", "\n".join(block)
                    block = []
            if block:
                yield f"{label}:{start}", "\n".join(block)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        yield f"{label}:{lineno + 1}", BadSample("bad_file", f"{type(e).__name__}: {e}")


def convert(inputs: str | Path | list, out: str | Path, *, name: str = DEFAULT_NAME, source: str | None = None,
            text_field: str = "text", min_chars: int = 20, shards: bool = False, shard_maxcount: int = 10_000,
            quiet: bool = False) -> dict:
    """Convert .txt / .jsonl corpora; returns the writer's stats dict."""
    files = expand_inputs(inputs, (".txt", ".txt.gz", ".txt.zip", ".jsonl", ".jsonl.gz", ".jsonl.zip", ".json.gz"))
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        for path in files:
            stem = file_stem(path)
            lower = path.name.lower()
            if ".txt" in lower and ".jsonl" not in lower:
                docs: Iterator = txt_documents(path)
            else:
                docs = iter_rows(path, fmt="jsonl")  # C4 names its jsonl files .json.gz
            for n, (where, doc) in enumerate(progress(docs, desc=f"{name} {path.name}", unit="doc",
                                                    writer=writer)):
                rid = f"{writer.source}/{stem}-{n}"
                with writer.row(id=rid, where=where):
                    if isinstance(doc, BadSample):
                        raise doc
                    text = doc if isinstance(doc, str) else field_value(doc, text_field)
                    if not isinstance(text, str) or not text.strip():
                        raise BadSample("missing_text", f"no text in field {text_field!r}"
                                        if isinstance(doc, dict) else "empty document")
                    text = text.strip()
                    if len(text) < min_chars:
                        raise BadSample("too_short", f"{len(text)} chars < --min-chars={min_chars}")
                    writer.write({"id": rid, "source": writer.source,
                                  "turns": [{"role": None, "content": [{"text": text}]}]}, where=where)
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, ".txt / .jsonl corpora (.gz/.zip ok): files, folders, globs")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the document (default text)")
    parser.add_argument("--min-chars", type=int, default=20, help="skip documents shorter than this (default 20)")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, text_field=args.text_field, min_chars=args.min_chars,
                   **writer_from_args(args))


if __name__ == "__main__":
    main()
