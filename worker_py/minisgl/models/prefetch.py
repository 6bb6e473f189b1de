"""Captured forwards prefetch the decoder layers' weights into L2 (`--weight-prefetch`).

At a few rows every projection is a short read of its weights, and HBM idles while the kernels between them
run (norms, RoPE, attention) and while each projection ramps up and drains. So before layer i runs, a side
stream issues the prefetch of what the GPU will read next: layer i's MLP (read after its attention) and layer
i+1's attention. L2 then holds at most about a layer's weights plus the next attention's, and every
projection after the first reads its weights from L2.

Only captured graphs prefetch: the side stream is part of each graph, forked at every layer and joined at the
end, and costs the host nothing at replay. An eager forward (a large prefill) skips it, as does a model whose
layer is too large for the L2 cache to hold it alongside the next one's attention.
"""

from __future__ import annotations

import logging

import torch

from minisgl.kernels import prefetch

log = logging.getLogger("minisgl.worker")

L2_SHARE = 0.75  # of the L2 cache, at most, that one prefetch point may fill

Stage = list[torch.Tensor]


class WeightPrefetch:
    """`stages[i]` is layer i's (attention weights, MLP weights), each in the order the layer reads them."""

    def __init__(self, stages: list[tuple[Stage, Stage]], mode: str, device: torch.device) -> None:
        self.points = [prefetch.PrefetchTable(p, mode) for p in points(stages)]
        self.stream = torch.cuda.Stream(device)
        self.largest = max((p.nbytes for p in self.points), default=0)

    @classmethod
    def for_layers(cls, layers, mode: str, device: torch.device) -> WeightPrefetch | None:
        """The prefetch of `layers` (each with `weight_stages()`), or None when a point would not fit L2."""
        plan = cls([layer.weight_stages() for layer in layers], mode, device)
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        if plan.largest > L2_SHARE * l2:
            log.info(
                "weight prefetch off: a layer's weights (%.1f MB) would not fit this GPU's L2 (%.1f MB)",
                plan.largest / 1e6,
                l2 / 1e6,
            )
            return None
        # Compiled now: the first launch must not happen inside a capture.
        prefetch.launch(plan.points[0])
        torch.cuda.synchronize(device)
        return plan

    def before_layer(self, i: int) -> None:
        """Forks the side stream off the current one and issues point `i` on it."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            prefetch.launch(self.points[i])

    def join(self) -> None:
        """The current stream waits for the side stream: a capture must end with every fork joined."""
        torch.cuda.current_stream().wait_stream(self.stream)


def points(stages: list[tuple[Stage, Stage]]) -> list[Stage]:
    """What is prefetched before each layer: its MLP's weights, then the next layer's attention's (and, before
    the first layer, its own attention's first)."""
    out = []
    for i, (attention, mlp) in enumerate(stages):
        ahead = stages[i + 1][0] if i + 1 < len(stages) else []
        out.append([*(attention if i == 0 else []), *mlp, *ahead])
    return out
