"""Safe, local-only weight loading shared by every model."""

from __future__ import annotations

from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A weight path is unset or absent; the message names the config key to set."""


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
