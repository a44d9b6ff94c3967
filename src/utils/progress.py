"""Progress bars for long loops (data_prep converters, write_stream, precompute_features, tokenize_images,
src.eval): tqdm on stderr with the counts of written and skipped records beside the rate, and off when stderr
is not a terminal, so logs, CI and captured output stay clean."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

__all__ = ["progress", "progress_bar"]


def _is_terminal(file: IO[str]) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(desc: str, total: int | None = None, unit: str = "rec", file: IO[str] | None = None) -> tqdm:
    """A bar to update by hand (`bar.update(n)`, `bar.set_postfix(...)`); disabled when `file` (default stderr)
    is not a terminal."""
    file = file if file is not None else sys.stderr
    return tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.5, file=file,
                disable=not _is_terminal(file))


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "rec",
             counts: Callable[[], Mapping[str, Any]] | None = None, file: IO[str] | None = None) -> Iterator[T]:
    """`iterable` with a bar; `counts()` (e.g. ``{"written": 10, "skipped": 2}``) is shown beside it, read after
    the consumer has handled each item."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:  # a generator; a DataLoader over an IterableDataset has __len__ but raises
            total = None
    bar = progress_bar(desc, total, unit, file)
    try:
        for item in iterable:
            yield item
            bar.update(1)
            if counts is not None and not bar.disable:
                bar.set_postfix(counts(), refresh=False)
    finally:
        bar.close()
