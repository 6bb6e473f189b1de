"""Model definitions and loading."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minisgl.models.config import ModelConfig
from minisgl.models.qwen2 import Qwen2ForCausalLM
from minisgl.models.weights import load_weights

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The model with uninitialised parameters on `device`; nothing is computed to initialise them."""
    try:
        cls = _ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; known: {sorted(_ARCHITECTURES)}"
        ) from None
    with torch.device("meta"):
        model = cls(config, dtype=dtype, device=device)
    model.to_empty(device=device)
    return model.requires_grad_(False).eval()


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    show_progress: bool = True,
) -> nn.Module:
    model = build_model(ModelConfig.from_dir(model_dir), dtype, device)
    load_weights(model, model_dir, show_progress=show_progress)
    return model


__all__ = ["ModelConfig", "Qwen2ForCausalLM", "build_model", "load_model"]
