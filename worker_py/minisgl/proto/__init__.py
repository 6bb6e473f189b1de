"""The Python side of minisgl's protocol (docs/protocol.md): ring access, slot layouts, message dicts."""

from minisgl.proto.channels import ResultWriter, StepReader
from minisgl.proto.ring import PeerDead, Ring, RingError
from minisgl.proto.step import Capacity, ResultLayout, ResultSlot, StepLayout, StepSlot, StepView

__all__ = [
    "Capacity",
    "PeerDead",
    "ResultLayout",
    "ResultSlot",
    "ResultWriter",
    "Ring",
    "RingError",
    "StepLayout",
    "StepReader",
    "StepSlot",
    "StepView",
]
