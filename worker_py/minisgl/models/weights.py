"""Loading safetensors checkpoints into a model built on the meta device and materialised empty."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm import tqdm


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool = True) -> None:
    """Copy every checkpoint tensor into its parameter (or its rows of a merged one), casting on the way.

    The model must provide `checkpoint_target(name) -> (param, first_row, rows) | None`. Fails if a
    checkpoint tensor has no parameter, or if a parameter is not entirely covered: an empty parameter would
    otherwise serve uninitialised memory.
    """
    params = dict(model.named_parameters())
    rows_loaded = dict.fromkeys(params, 0)
    files = checkpoint_files(model_dir)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for handle in handles:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                bar.update(1)
                target = model.checkpoint_target(name)
                if target is None:
                    continue
                pname, start, rows = target
                if pname not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter {pname!r} in the model")
                param = params[pname]
                dst = param.data if rows < 0 else param.data.narrow(0, start, rows)
                src = handle.get_tensor(name)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(src.shape)}, model expects {tuple(dst.shape)}"
                    )
                dst.copy_(src)
                rows_loaded[pname] += dst.shape[0] if dst.dim() else 1
    missing = [n for n, p in params.items() if rows_loaded[n] != (p.shape[0] if p.dim() else 1)]
    if missing:
        raise ValueError(f"parameters not (fully) loaded from {model_dir}: {missing}")
