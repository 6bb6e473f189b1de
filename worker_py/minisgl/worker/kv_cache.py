"""The physical KV cache: per layer, K and V pages in FlashInfer's NHD layout; and the token id at each
location."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_ID_BYTES = 4  # the int32 token id kept beside each location's K and V


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        kv = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem
        return kv + self.page_size * TOKEN_ID_BYTES

    def pages_for_budget(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.bytes_per_page)


class KVCache:
    """K and V for every layer, `[num_pages, page_size, num_kv_heads, head_dim]` each, allocated once.

    One allocation holds everything; each layer's K and V are contiguous views of it. It starts zeroed because
    backends that pad (the torch reference) read slots that were never written and multiply them by a zero
    weight, and 0 * NaN garbage would poison the output.

    `token_ids[loc]` is the id of the token whose K and V are at `loc` (every step writes it with them): a
    request that reuses cached pages finds its prefix's ids there, which its penalties count.
    """

    def __init__(self, shape: KVCacheShape, num_pages: int, device: torch.device | str) -> None:
        if num_pages <= 0:
            raise ValueError(f"the KV cache needs at least one page, got {num_pages}")
        self.shape = shape
        self.num_pages = num_pages
        self.page_size = shape.page_size
        self._storage = torch.zeros(
            2,
            shape.num_layers,
            num_pages,
            shape.page_size,
            shape.num_kv_heads,
            shape.head_dim,
            dtype=shape.dtype,
            device=device,
        )
        self.token_ids = torch.zeros(num_pages * shape.page_size, dtype=torch.int32, device=device)

    def k(self, layer: int) -> torch.Tensor:
        return self._storage[0, layer]

    def v(self, layer: int) -> torch.Tensor:
        return self._storage[1, layer]

    def flat_k(self, layer: int) -> torch.Tensor:
        """K of one layer addressed by flat location `page * page_size + offset`: [locations, Hkv, D]."""
        return self._storage[0, layer].view(-1, self.shape.num_kv_heads, self.shape.head_dim)

    def flat_v(self, layer: int) -> torch.Tensor:
        return self._storage[1, layer].view(-1, self.shape.num_kv_heads, self.shape.head_dim)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor) -> None:
        """Writes new tokens' K and V ([t, Hkv, D]) at flat locations `loc` ([t])."""
        self.flat_k(layer)[loc] = k
        self.flat_v(layer)[loc] = v

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size() + self.token_ids.numel() * TOKEN_ID_BYTES
