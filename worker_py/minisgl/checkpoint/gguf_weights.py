"""A GGUF's tensors as HF's: named by the architecture's table, dequantized with the `gguf` package (numpy
only), shape-checked against the config, with llama.cpp's rotary row order undone and stacked experts split,
saved as one bf16 `model.safetensors`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from minisgl.checkpoint.gguf_arch import Architecture, architecture_of, dims
from minisgl.checkpoint.gguf_meta import CheckpointError
from minisgl.checkpoint.gguf_rope import ROPE_FREQS

EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"
GLOBAL = {"output_norm.weight": ("model.norm.weight", ("hidden",))}
# Rows compared to tell a second copy of the embedding from a separate output matrix.
SAMPLE_ROWS = 256


@dataclass(frozen=True)
class Embeddings:
    """Whether the checkpoint ties input and output embeddings, and which GGUF tensor becomes embed_tokens."""

    tied: bool
    source: str


# ----------------------------------------------------------------------------------------------------
# Input and output embeddings


def bits_per_weight(tensor) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    return size * 8 / block


def sample_rows(tensor):
    import gguf
    import numpy as np

    rows = np.unique(np.linspace(0, tensor.data.shape[0] - 1, SAMPLE_ROWS).astype(np.int64))
    return np.asarray(gguf.dequantize(tensor.data[rows], tensor.tensor_type), dtype=np.float64).reshape(-1)


def plan_embeddings(reader) -> Embeddings:
    """A GGUF without `output` ties them (its converter drops the copy). One with both may hold one matrix
    quantized twice (the default model: Q5_0 and Q8_0 copies, cosine 0.999), which upstream ties, or two
    different matrices (cosine near 0), which it does not: compare them, and keep the finer copy of one."""
    import numpy as np

    by_name = {t.name: t for t in reader.tensors}
    if EMBEDDING not in by_name:
        raise CheckpointError(f"the GGUF has no {EMBEDDING}")
    if OUTPUT not in by_name:
        return Embeddings(tied=True, source=EMBEDDING)
    embedding, output = by_name[EMBEDDING], by_name[OUTPUT]
    if tuple(embedding.shape) != tuple(output.shape):
        return Embeddings(tied=False, source=EMBEDDING)
    a, b = sample_rows(embedding), sample_rows(output)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    if cosine < 0.99:
        return Embeddings(tied=False, source=EMBEDDING)
    finer = OUTPUT if bits_per_weight(output) >= bits_per_weight(embedding) else EMBEDDING
    return Embeddings(tied=True, source=finer)


def vocab_rows(reader, embeddings: Embeddings) -> int:
    return int(next(t for t in reader.tensors if t.name == embeddings.source).shape[1])


# ----------------------------------------------------------------------------------------------------
# Names and shapes


def hf_name(
    gguf_name: str, arch: str = "qwen2", embeddings: Embeddings = Embeddings(True, OUTPUT)
) -> str | None:
    """The HF tensor name for a GGUF tensor (with `{expert}` for stacked experts); None for one not kept."""
    if gguf_name in (EMBEDDING, OUTPUT):
        if gguf_name == embeddings.source:
            return "model.embed_tokens.weight"
        # A tied checkpoint keeps one copy; an untied one has the other as its output layer.
        return None if embeddings.tied else "lm_head.weight"
    if gguf_name in GLOBAL:
        return GLOBAL[gguf_name][0]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+\.(?:weight|bias))", gguf_name)
    table = architecture_of(arch)
    if match is None or match.group(2) not in table.layer:
        raise CheckpointError(f"unexpected GGUF tensor {gguf_name!r} for architecture {arch!r}")
    layer, part = match.groups()
    return f"model.layers.{layer}.{table.layer[part].hf}"


def expected_shapes(table: Architecture, config: dict, embeddings: Embeddings) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the checkpoint must have, per expert for experts."""
    size = dims(config)
    shapes = {"model.embed_tokens.weight": (size["vocab"], size["hidden"])}
    shapes |= {hf: tuple(size[d] for d in shape) for hf, shape in GLOBAL.values()}
    if not embeddings.tied:
        shapes["lm_head.weight"] = (size["vocab"], size["hidden"])
    for i in range(config["num_hidden_layers"]):
        for weight in table.layer.values():
            if weight.when is not None and not config[weight.when]:
                continue
            shape = tuple(size[d] for d in weight.shape)
            name = f"model.layers.{i}.{weight.hf}"
            if weight.per_expert:
                shapes |= {name.format(expert=e): shape[1:] for e in range(shape[0])}
            else:
                shapes[name] = shape
    return shapes


def unpermute_rotary(values, heads: int):
    """Undo llama.cpp's row order: within each head it interleaves the two rotary halves (rows 0, d/2, 1,
    d/2+1, ...); HF keeps the first half's rows, then the second's."""
    rows = values.shape[0]
    if rows % (2 * heads):
        raise CheckpointError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    rest = values.shape[1:]
    return values.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(values.shape)


# ----------------------------------------------------------------------------------------------------
# model.safetensors


def write_weights(reader, arch: str, config: dict, embeddings: Embeddings, path: Path) -> None:
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    table = architecture_of(arch)
    wanted = expected_shapes(table, config, embeddings)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        if tensor.name == ROPE_FREQS:
            continue  # read into config.json's rope_scaling
        name = hf_name(tensor.name, arch, embeddings)
        if name is None:
            continue
        part = tensor.name.split(".", 2)[-1]
        weight = table.layer.get(part) if tensor.name.startswith("blk.") else None
        # GGUF lists dimensions fastest-first; HF (row-major) wants them the other way round.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if weight is not None and weight.per_expert:
            parts = {name.format(expert=e): values[e] for e in range(shape[0])}
        else:
            if weight is not None and weight.rotary_heads is not None:
                values = unpermute_rotary(values, config[weight.rotary_heads])
            parts = {name: values}
        for hf, array in parts.items():
            if hf not in wanted:
                raise CheckpointError(
                    f"{tensor.name} -> {hf}: the config says the checkpoint has no such tensor"
                )
            if array.shape != wanted[hf]:
                raise CheckpointError(f"{tensor.name} -> {hf}: shape {array.shape}, expected {wanted[hf]}")
            # F32 tensors come back as read-only views of the mmap; torch wants memory it may write.
            tensors[hf] = torch.from_numpy(np.array(array, copy=True)).to(torch.bfloat16)
    absent = sorted(set(wanted) - set(tensors))
    if absent:
        raise CheckpointError(f"the GGUF lacks {len(absent)} tensors, first {absent[0]}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; the rest of the directory is world-readable.
    path.chmod(0o644)
