"""How a model splits over tensor-parallel ranks: the rules the layers build by, and the launcher's check of
a checkpoint against them before any process starts. Standard library only (the launcher imports it).

Query heads, the MLP's intermediate dimension and each expert's intermediate dimension split evenly: a size
that does not divide by the number of ranks is refused, by name. KV heads split evenly while there are at
least as many as ranks; with fewer, each rank holds one KV head, the one its query heads read, and each KV
head is held by `ranks / kv_heads` ranks (so the ranks must be a multiple of the KV heads). The vocabulary
splits into equal slices padded at the end, so it never has to divide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_RANKS = 4  # the step ring's readers (docs/protocol.md): one per rank


class CannotSplit(ValueError):
    """The model does not split over the ranks asked for."""


def kv_part(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(index, count): rank `tp_rank` holds slice `index` of `count` equal slices of the K and V heads."""
    if tp_size <= num_kv_heads:
        return tp_rank, tp_size
    # With fewer KV heads than ranks, rank r's query heads all belong to KV head r * kv / tp (as kv divides
    # tp and the query heads divide tp, a rank's run of query heads never crosses a group boundary).
    return tp_rank * num_kv_heads // tp_size, num_kv_heads


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    return max(1, num_kv_heads // tp_size)


def problems(config: dict[str, Any], tp_size: int) -> list[str]:
    """What keeps a model with this config.json from splitting over `tp_size` ranks (empty: nothing)."""
    if tp_size == 1:
        return []
    out = []
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    if heads % tp_size:
        out.append(f"its {heads} attention heads do not split evenly over {tp_size} ranks")
    if kv >= tp_size and kv % tp_size:
        out.append(f"its {kv} KV heads do not split evenly over {tp_size} ranks")
    if kv < tp_size and tp_size % kv:
        out.append(f"its {kv} KV heads cannot be replicated over {tp_size} ranks (not a multiple of {kv})")
    experts = config.get("num_experts", config.get("num_local_experts", 0)) or 0
    if experts and config["moe_intermediate_size"] % tp_size:
        inter = config["moe_intermediate_size"]
        out.append(f"its experts' intermediate size {inter} does not split evenly over {tp_size} ranks")
    dense_layers = not experts or config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) > 1
    if dense_layers and config["intermediate_size"] % tp_size:
        inter = config["intermediate_size"]
        out.append(f"its intermediate size {inter} does not split evenly over {tp_size} ranks")
    return out


def check_model(model_dir: str | Path, tp_size: int) -> None:
    """Raises CannotSplit naming every reason the model in `model_dir` cannot run over `tp_size` ranks, and
    the sizes that would work."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    found = problems(config, tp_size)
    if found:
        fits = [n for n in range(1, MAX_RANKS + 1) if not problems(config, n)]
        raise CannotSplit(
            f"--tp {tp_size}: {Path(model_dir).name} cannot be split over {tp_size} ranks: "
            f"{'; '.join(found)} (sizes that work: {', '.join(map(str, fits))})"
        )
