"""Reading a GGUF file's metadata: the error every conversion step raises, and typed look-ups of its keys."""

from __future__ import annotations

import sys


class CheckpointError(Exception):
    """A check of the GGUF or of what was built from it failed; the message says which."""


def log(message: str) -> None:
    print(f"gguf: {message}", file=sys.stderr, flush=True)


def field(reader, key: str):
    """The value of metadata `key`; a CheckpointError naming the key when the file lacks it."""
    if key not in reader.fields:
        raise CheckpointError(f"the GGUF has no {key!r} metadata")
    return reader.fields[key].contents()


def optional_field(reader, key: str, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def float32_value(value: float) -> float:
    """GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07. Keep the shortest float32 spelling."""
    import numpy as np

    return float(str(np.float32(value)))


def architecture(reader) -> str:
    return str(field(reader, "general.architecture"))


def tensor_names(reader) -> set[str]:
    return {t.name for t in reader.tensors}
