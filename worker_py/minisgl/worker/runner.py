"""The step runner: one scheduler step in, one sampled token per request out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from minisgl.attention import AttentionConfig, create_backend
from minisgl.models import ModelConfig, load_model
from minisgl.sampling import Sampler
from minisgl.worker.batch import BatchUploader, ForwardBatch
from minisgl.worker.config import RunnerConfig, dtype_name, parse_dtype
from minisgl.worker.kv_cache import KVCache, KVCacheShape


class ModelRunner:
    """Owns the weights, the KV cache, the attention backend, the sampler and each slot's last token.

    Per step the host work is a fixed number of numpy/torch calls whatever the batch size: one upload of the
    packed step arrays, one forward, one sampling pass, one download of the sampled ids.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32,
        num_pages: int | None = None,
        page_size: int = 16,
        max_batch: int = 64,
        max_tokens: int = 8192,
        attention: str = "torch",
        kv_memory_bytes: int | None = None,
        kv_memory_fraction: float = 0.85,
        show_progress: bool = True,
    ) -> None:
        self.config = RunnerConfig(
            model_dir=str(model_dir),
            device=torch.device(device),
            dtype=parse_dtype(dtype),
            num_pages=num_pages,
            page_size=page_size,
            max_batch=max_batch,
            max_tokens=max_tokens,
            attention=attention,
            kv_memory_bytes=kv_memory_bytes,
            kv_memory_fraction=kv_memory_fraction,
        )
        cfg = self.config
        self.device = cfg.device
        self.model_config = ModelConfig.from_dir(cfg.model_dir)
        self.model = load_model(cfg.model_dir, cfg.dtype, cfg.device, show_progress=show_progress)
        mc = self.model_config
        kv_shape = KVCacheShape(mc.num_layers, cfg.page_size, mc.num_kv_heads, mc.head_dim, cfg.dtype)
        self.kv_cache = KVCache(kv_shape, self._num_pages(kv_shape), cfg.device)
        self.attn = create_backend(
            cfg.attention,
            AttentionConfig(mc.num_heads, mc.num_kv_heads, mc.head_dim, cfg.page_size),
            self.kv_cache,
        )
        self.sampler = Sampler(cfg.max_batch, cfg.device)
        # The token each slot sampled last: decode inputs name it as -(slot + 1), so the host never needs it.
        self.last_token = torch.zeros(cfg.max_batch, dtype=torch.int32, device=cfg.device)
        self.uploader = BatchUploader(self._staging_capacity(), cfg.device)

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    def model_facts(self) -> dict[str, Any]:
        mc = self.model_config
        return {
            "architecture": mc.architecture,
            "vocab_size": mc.vocab_size,
            "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size,
            "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "max_position_embeddings": mc.max_position_embeddings,
            "dtype": dtype_name(self.config.dtype),
            "device": str(self.device),
        }

    @torch.inference_mode()
    def run_step(self, step) -> torch.Tensor:
        """Runs one extend or decode step; returns the sampled ids, int32 [n] on the CPU, in request order."""
        batch, logits = self._forward(step)
        if batch is None:
            return torch.empty(0, dtype=torch.int32)
        mode = self.sampler.mode_for(np.asarray(step.req_slot))
        tokens = self.sampler.sample(logits, batch.req_slot, batch.seq_len, mode)
        self.last_token[batch.req_slot] = tokens
        return tokens.cpu()

    @torch.inference_mode()
    def forward_logits(self, step) -> torch.Tensor:
        """Runs the step's forward (writing its K/V like run_step) and returns the logits of each request's
        last new token, [n, vocab] on the device; nothing is sampled and no slot's last token changes."""
        _batch, logits = self._forward(step)
        return logits

    def _forward(self, step) -> tuple[ForwardBatch | None, torch.Tensor]:
        n, t = len(step.req_slot), len(step.input_ids)
        if n > self.config.max_batch or t > self.config.max_tokens:
            raise ValueError(
                f"step of {n} requests / {t} tokens exceeds {self.max_batch} / {self.max_tokens}"
            )
        if len(step.join_slot):
            self.sampler.set_params(
                step.join_slot, step.join_temperature, step.join_top_p, step.join_top_k, step.join_seed
            )
        if n == 0:
            return None, torch.empty(0, self.model_config.vocab_size, device=self.device)
        batch = self.uploader.upload(step)
        ids = batch.input_ids
        ids = torch.where(ids >= 0, ids, self.last_token[(-1 - ids).clamp(min=0)])
        self.attn.plan(batch)
        hidden = self.model(ids, batch.positions, self.attn)
        return batch, self.model.compute_logits(hidden[batch.qo_indptr[1:] - 1])

    def _num_pages(self, shape: KVCacheShape) -> int:
        cfg = self.config
        if cfg.num_pages is not None:
            return cfg.num_pages
        if cfg.kv_memory_bytes is not None:
            budget = cfg.kv_memory_bytes
        elif cfg.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(cfg.device)
            budget = int(free * cfg.kv_memory_fraction)
        else:
            raise ValueError("on the CPU give num_pages or kv_memory_bytes")
        pages = shape.pages_for_budget(budget)
        if pages <= 0:
            raise ValueError(f"a KV budget of {budget} bytes holds no page of {shape.bytes_per_page} bytes")
        return pages

    def _staging_capacity(self) -> int:
        # Tokens: ids, positions, out_loc. Requests: slot, seq_len, two indptrs, last-page length. KV indices:
        # at most every page once per request; the uploader grows past this if prefix sharing needs more.
        cfg = self.config
        return 3 * cfg.max_tokens + 5 * cfg.max_batch + 2 + self.num_pages
