"""Model families, keyed by the `architectures` entry of a Hugging Face config.json.

Adding a family: a file here that subclasses `CausalLM` (or a family close to it) and composes its decoder
layer from `minisgl.layers`, one line in `MODELS`, and a parity test against transformers
(docs/architecture.md, "Adding a model").
"""

from __future__ import annotations

from pathlib import Path

import torch

from minisgl.layers import LayerOptions
from minisgl.models.base import CausalLM
from minisgl.models.config import ModelConfig, UnsupportedConfig
from minisgl.models.llama import LlamaForCausalLM, MistralForCausalLM
from minisgl.models.qwen2 import Qwen2ForCausalLM
from minisgl.models.qwen3 import Qwen3ForCausalLM
from minisgl.models.qwen3_moe import Qwen3MoeForCausalLM
from minisgl.models.weights import load_weights

MODELS: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(config: ModelConfig) -> type[CausalLM]:
    try:
        return MODELS[config.architecture]
    except KeyError:
        raise UnsupportedConfig(
            f"unsupported architecture {config.architecture!r}; known: {', '.join(sorted(MODELS))}"
        ) from None


def build_model(config: ModelConfig, options: LayerOptions, device: torch.device | str) -> CausalLM:
    """The model with uninitialised parameters on `device`; nothing is computed to initialise them."""
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, options, device)
    model.to_empty(device=device)
    return model.requires_grad_(False).eval()


def load_model(
    model_dir: str | Path, options: LayerOptions, device: torch.device | str, show_progress: bool = True
) -> CausalLM:
    model = build_model(ModelConfig.from_dir(model_dir), options, device)
    load_weights(model, model_dir, show_progress=show_progress)
    return model


__all__ = [
    "MODELS",
    "CausalLM",
    "ModelConfig",
    "UnsupportedConfig",
    "build_model",
    "load_model",
    "model_class",
]
