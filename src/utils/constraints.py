"""Typed config: the value constraints (`Annotated` markers) and the pydantic base class of every stage's and
datamodule's config model; src/utils/config.py validates the composed yaml with them before any model is built.

A rule lives once, where the value's type is declared (`batch_size: PositiveInt`, `drop_rate: Fraction`,
`tokenizer_path: TokenizerDir`); pydantic runs it, and the messages say the rule (`must be in [0, 1], got 2`).
At run time the annotated values are plain ints/strs.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import core_schema


class ConfigValueError(ValueError):
    """A cross-check that fails names its key itself (relative to the node it checks, e.g. `patch_size`, or
    absolute, e.g. `model.vit.output_dim`): reported under that key, never guessed from the message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Marker:
    """A constraint pydantic runs after the type check (`violation` says what is wrong, or None)."""

    def violation(self, value: Any) -> str | None:
        raise NotImplementedError

    def runs(self, context: Any) -> bool:
        return True

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def check(value: Any, info: core_schema.ValidationInfo) -> Any:
            if self.runs(info.context):
                msg = self.violation(value)
                if msg:
                    raise ValueError(msg)
            return value

        return core_schema.with_info_after_validator_function(check, handler(source))


@dataclass(frozen=True)
class Range(_Marker):
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
class LocalPath(_Marker):
    """The value names a local file or folder the code reads. Checked before a run (validation context
    `check_paths`), not for meta builds."""

    kind: str = "file"  # "file" (any existing path) | "dir"
    what: str = "a local path"
    required: bool = True  # unset (null / "") is a problem too

    def runs(self, context: Any) -> bool:
        return bool((context or {}).get("check_paths"))

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


class ConfigModel(BaseModel):
    """One config node as yaml gives it: exact types (no `true` for an int, no "5" for a number), no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_lists_as_tuples(cls, values: Any) -> Any:
        # yaml has lists only; a `tuple[...]` field takes one (strict mode would refuse it)
        if not isinstance(values, dict):
            return values
        fields = cls.model_fields
        return {k: tuple(v) if isinstance(v, list) and k in fields and _is_tuple(fields[k].annotation) else v
                for k, v in values.items()}


def _is_tuple(tp: Any) -> bool:
    if typing.get_origin(tp) is Annotated:
        return _is_tuple(tp.__origin__)
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return any(_is_tuple(a) for a in typing.get_args(tp))
    return tp is tuple or typing.get_origin(tp) is tuple
