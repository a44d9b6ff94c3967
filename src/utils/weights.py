"""Safe, local-only weight loading shared by every model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class MissingWeightsError(FileNotFoundError, ValueError):
    """A weight path is unset or absent; the message names the config key to set."""


@dataclass(frozen=True)
class RequiredPath:
    """One local path a build reads: model configs list theirs (`required_paths()`), so the pre-run check
    (src/utils/config.py) and the build-time check (`check_paths`) share one source of truth."""

    key: str  # the config key, e.g. "model.vit.weights"
    what: str  # what belongs there, e.g. "the Qwen-VL ViT state dict (qwen_vit_G.pt)"
    value: str | None
    kind: str = "file"  # "file" | "dir"
    required: bool = True  # False: only checked when set

    def problem(self) -> str | None:
        if not self.value:
            return f"needs {self.what}, but it is not set" if self.required else None
        p = Path(self.value)
        if p.is_dir() if self.kind == "dir" else p.exists():
            return None
        return f"needs {self.what}, but '{self.value}' does not exist"


def missing_paths(paths: Iterable[RequiredPath]) -> list[tuple[str, str]]:
    """(key, problem) for every required path that is unset or absent, each key once."""
    out: dict[str, str] = {}
    for p in paths:
        msg = p.problem()
        if msg and p.key not in out:
            out[p.key] = f"{msg}; set `{p.key}=/local/path`"
    return list(out.items())


def check_paths(paths: Iterable[RequiredPath]) -> None:
    """Raise one MissingWeightsError that lists every missing path (not one per try)."""
    missing = missing_paths(paths)
    if missing:
        lines = [f"{len(missing)} missing weight path(s) (weights are never downloaded):"]
        lines += [f"  {key}: {msg}" for key, msg in missing]
        raise MissingWeightsError("\n".join(lines))


def missing_weights_error(key: str, what: str, path: str | None = None) -> MissingWeightsError:
    where = f"'{path}' does not exist" if path else "it is not set"
    return MissingWeightsError(
        f"{key}: needs {what}, but {where}. Set `{key}=/local/path` (weights are never downloaded)."
    )


def load_state_dict_file(path: str | None, key: str) -> dict:
    """Load .safetensors with safetensors, anything else with torch.load(weights_only=True)."""
    if not path or not Path(path).exists():
        raise missing_weights_error(key, "a local weights file", path)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_keys_and_shapes(own: dict[str, tuple], given: dict[str, tuple], header: str, given_as: str) -> None:
    """One ``ValueError`` naming every missing, unexpected and wrong-shape key of ``given`` against ``own``."""
    missing = sorted(own.keys() - given.keys())
    unexpected = sorted(given.keys() - own.keys())
    wrong = [f"{k}: {given_as} {given[k]} != model {own[k]}" for k in sorted(own.keys() & given.keys())
             if given[k] != own[k]]
    if missing or unexpected or wrong:
        lines = [header]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))


def load_state_dict_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str = "") -> None:
    """Strict load whose error names every missing, unexpected and wrong-shape key."""
    own = module.state_dict()
    check_keys_and_shapes({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()},
                          f"checkpoint does not match {what or type(module).__name__}:", "checkpoint")
    # A meta-built model has no storage to copy into, so take the checkpoint tensors instead.
    assign = any(t.is_meta for t in own.values())
    module.load_state_dict(sd, strict=True, assign=assign)
