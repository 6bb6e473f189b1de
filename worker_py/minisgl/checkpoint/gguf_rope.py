"""A GGUF's rotary-embedding scaling, as HF's `rope_scaling` config field.

GGUF says it two ways. Linear and YaRN scaling are metadata (`{arch}.rope.scaling.type`, `.factor`,
`.original_context_length`, YaRN's betas). Llama 3's frequency-dependent scaling has no metadata: the
converter stores its result, one divisor per rotary frequency, as the tensor `rope_freqs.weight`. Those
divisors follow a known curve (1 for short wavelengths, `factor` for long ones, a smooth blend between), so we
recover the curve's parameters from them and check that the parameters reproduce every divisor.
"""

from __future__ import annotations

import math

from minisgl.checkpoint.gguf_meta import CheckpointError, float32_value, optional_field

ROPE_FREQS = "rope_freqs.weight"


def rope_scaling(reader, arch: str, config: dict) -> dict | None:
    """HF's `rope_scaling` for the GGUF, or None when it has no scaling."""
    check_rotary_dims(reader, arch, config)
    kind = optional_field(reader, f"{arch}.rope.scaling.type")
    factor = optional_field(reader, f"{arch}.rope.scaling.factor")
    if kind is None and optional_field(reader, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", optional_field(reader, f"{arch}.rope.scale_linear")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        if kind not in (None, "none"):
            raise CheckpointError(f"the GGUF has both {ROPE_FREQS} and rope scaling type {kind!r}")
        return llama3_scaling(freqs, config)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise CheckpointError(f"rope scaling type {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float32_value(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float32_value(factor)}
        original = optional_field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = optional_field(reader, f"{arch}.rope.scaling.{key}")
            if value is not None:
                scaling[hf_key] = float32_value(value)
        return scaling
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (linear, yarn and llama3 are)")


def check_rotary_dims(reader, arch: str, config: dict) -> None:
    """These families rotate every dimension of a head; a GGUF that rotates fewer is another model."""
    rotary = optional_field(reader, f"{arch}.rope.dimension_count")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(
            f"the GGUF rotates {rotary} of {head_dim} head dimensions; only all are supported"
        )


def llama3_divisors(params: dict, theta: float, head_dim: int) -> list[float]:
    """What each rotary frequency is divided by under Llama 3 scaling with `params`."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            blend = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - blend) / factor + blend))
    return divisors


def llama3_scaling(tensor, config: dict) -> dict | None:
    import gguf
    import numpy as np

    divisors = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config["rope_theta"]
    if divisors.shape != (head_dim // 2,):
        raise CheckpointError(f"{ROPE_FREQS} has {divisors.size} values, expected {head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    # In the blend, 1/divisor = (1 - s)/factor + s with s = (original/wavelength - low) / (high - low): s is a
    # line in 1/wavelength. Only the ratios original/low and original/high show in the divisors, so fix
    # low = 1 (what every Llama 3 release uses) and read high and original off the line.
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    blended = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if blended.sum() < 2:
        raise CheckpointError(
            f"{ROPE_FREQS} has fewer than two blended frequencies: cannot recover its curve"
        )
    s = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelength[blended], s, 1)
    if intercept >= 0:
        raise CheckpointError(f"{ROPE_FREQS} does not follow the Llama 3 scaling curve")
    high = 1 - 1 / intercept
    params = {
        "rope_type": "llama3",
        "factor": float32_value(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": float32_value(round(high, 4)),
        "original_max_position_embeddings": round(-slope / intercept),
    }
    if not np.allclose(llama3_divisors(params, theta, head_dim), divisors, rtol=1e-3, atol=0):
        raise CheckpointError(f"{ROPE_FREQS} does not follow the Llama 3 scaling curve")
    return params
