"""Bad data as data: :class:`BadSample` (raised where a sample cannot be used), :class:`SkippedSample` (what a
reader yields in its place, in the same stream) and :class:`SkipCounter` (counted by source and reason).
Skip reasons are listed in ``src/data/records.py``."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

# The logger keeps the name it had before records.py was split (log filters and tests name it).
log = logging.getLogger("src.data.records")

__all__ = ["BadSample", "SkipCounter", "SkippedSample"]


class BadSample(Exception):
    """A sample that cannot be used. ``reason`` is a short snake_case tag, ``detail`` says what exactly.

    ``source`` / ``id`` / ``where`` are filled in by readers when they know them.
    """

    def __init__(self, reason: str, detail: str = "", *, source: str | None = None,
                 id: str | None = None, where: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.source = source
        self.id = id
        self.where = where

    def __reduce__(self):  # keep reason/detail when pickled across DataLoader workers
        return (functools.partial(BadSample, self.reason, self.detail),
                (), {"source": self.source, "id": self.id, "where": self.where})

    def to_skipped(self, source: str | None = None, id: str | None = None,
                   where: str | None = None) -> SkippedSample:
        return SkippedSample(reason=self.reason, source=self.source or source or "unknown",
                             id=self.id or id, where=self.where or where or "?", detail=self.detail)


@dataclass
class SkippedSample:
    """What a reader yields in place of a record it had to drop."""

    reason: str
    source: str
    id: str | None
    where: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"skipped {self.reason} [source={self.source} id={self.id} at {self.where}]: {self.detail}"


class SkipCounter:
    """Counts skipped samples by (source, reason); mergeable across workers / ranks; picklable.

    ``add`` logs the first ``log_first`` skips of each reason at WARNING with their source and location
    (later ones at DEBUG) and keeps up to ``max_examples`` of them in ``examples``.
    """

    def __init__(self, log_first: int = 5, max_examples: int = 20):
        self.log_first = log_first
        self.max_examples = max_examples
        self._counts: Counter[tuple[str, str]] = Counter()
        self._logged: Counter[str] = Counter()
        self.examples: list[SkippedSample] = []

    def add(self, skipped: SkippedSample) -> SkippedSample:
        self._counts[(skipped.source, skipped.reason)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(skipped)
        if self._logged[skipped.reason] < self.log_first:
            self._logged[skipped.reason] += 1
            log.warning("%s", skipped)
        else:
            log.debug("%s", skipped)
        return skipped

    def merge(self, other: SkipCounter) -> SkipCounter:
        self._counts.update(other._counts)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])
        return self

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def counts_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self._counts.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def counts_by_source(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (source, _), n in self._counts.items():
            out[source] += n
        return dict(sorted(out.items()))

    def counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: n}}."""
        out: dict[str, dict[str, int]] = {}
        for (source, reason), n in sorted(self._counts.items()):
            out.setdefault(source, {})[reason] = n
        return out

    def to_metrics(self, prefix: str = "data/skipped") -> dict[str, int]:
        metrics = {f"{prefix}/{reason}": n for reason, n in self.counts_by_reason().items()}
        metrics[f"{prefix}/total"] = self.total
        return metrics

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, by_reason={self.counts_by_reason()})"
