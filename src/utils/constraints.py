"""Value constraints for `Annotated[...]` parameter and field types, checked by src/utils/config.py.

Code that consumes a value declares what it accepts where it takes it (a constructor parameter, a
config dataclass field): `batch_size: PositiveInt`, `drop_rate: Fraction`, `tokenizer_path: TokenizerDir`.
`check_config` reads these markers before any model is built; at run time they are plain ints/strs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any


@dataclass(frozen=True)
class Range:
    """Numeric bounds (`ge`/`gt`/`le`/`lt`), plus `also`: sentinel values allowed outside them (-1 = unlimited)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()

    def describe(self) -> str:
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        high = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        if self.ge is not None and self.le is not None:
            text = f"in [{self.ge}, {self.le}]"
        else:
            text = " and ".join(t for t in (low, high) if t)
        return " or ".join([*(repr(a) for a in self.also), text]) if self.also else text

    def violation(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in self.also:
            return None
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"must be {self.describe()}, got {value!r}"


@dataclass(frozen=True)
class LocalPath:
    """The value names a local file or folder the code reads. Checked before a run (not for meta builds)."""

    kind: str = "file"  # "file" (any existing path) | "dir"
    what: str = "a local path"
    required: bool = True  # unset (null / "") is a problem too

    def violation(self, value: Any) -> str | None:
        from src.utils.weights import RequiredPath  # one existence rule for markers and model configs

        return RequiredPath("", self.what, value, self.kind, self.required).problem()


@dataclass(frozen=True)
class StreamDirPath(LocalPath):
    """A stream dir of data_prep/write_stream.py (null: none); remote URLs are checked when opened."""

    def violation(self, value: Any) -> str | None:
        from src.data.stream import stream_problem

        return None if value in (None, "") else stream_problem(str(value))


PositiveInt = Annotated[int, Range(gt=0)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
# Lightning's step/epoch counts: -1 means unlimited.
CountOrUnlimited = Annotated[int, Range(gt=0, also=(-1,))]
TokenizerDir = Annotated[str | None, LocalPath("dir", "a local tokenizer folder (tokenizer files; never downloaded)")]
StreamDir = Annotated[str | None, StreamDirPath("dir", "a stream dir (python -m data_prep.write_stream)", False)]
