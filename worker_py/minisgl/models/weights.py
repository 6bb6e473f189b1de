"""Loading safetensors checkpoints into a model built on the meta device and materialised empty."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from minisgl.layers.loading import ALL


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def loader(model: nn.Module, pname: str):
    """(load(tensor, shard), shards) of parameter `pname` (`minisgl.layers.loading`)."""
    owner, _, attr = pname.rpartition(".")
    return model.get_submodule(owner).loaders[attr]


def load_weights(model: nn.Module, model_dir: str | Path, show_progress: bool = True) -> None:
    """Hands every checkpoint tensor to its parameter's loader, casting on the way.

    Fails if a checkpoint tensor has no parameter, or if a parameter is not entirely covered: an empty
    parameter would otherwise serve uninitialised memory.
    """
    params = dict(model.named_parameters())
    filled: dict[str, set] = {name: set() for name in params}
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in checkpoint_files(model_dir)]
    total = sum(len(list(h.keys())) for h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress) as bar:
        for handle in handles:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                bar.update(1)
                target = model.checkpoint_target(name)
                if target is None:
                    continue
                pname, shard = target
                if pname not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter {pname!r} in the model")
                load, shards = loader(model, pname)
                try:
                    load(handle.get_tensor(name), shard)
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{name}: {e}") from None
                filled[pname].update(shards if shard == ALL else (shard,))
    missing = [n for n in params if filled[n] != set(loader(model, n)[1])]
    if missing:
        raise ValueError(f"parameters not (fully) loaded from {model_dir}: {missing}")
