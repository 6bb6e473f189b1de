"""The building blocks models are composed of. Each layer owns its parameters' loading (`loading.py`) and
chooses its kernels when it is built (`LayerOptions`)."""

from minisgl.layers.attention import Attention
from minisgl.layers.embedding import LMHead, StepTokens, VocabEmbedding
from minisgl.layers.linear import Linear
from minisgl.layers.mlp import GatedMLP
from minisgl.layers.moe import MoE
from minisgl.layers.norm import RMSNorm
from minisgl.layers.options import LayerOptions
from minisgl.layers.rotary import RopeScaling, RotaryEmbedding

__all__ = [
    "Attention",
    "GatedMLP",
    "LMHead",
    "LayerOptions",
    "Linear",
    "MoE",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "StepTokens",
    "VocabEmbedding",
]
