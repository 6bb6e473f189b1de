"""The worker's two ends of the rings, put together: read steps from the step ring, write results into the
result ring. Everything per slot (numpy views, offsets) is built once here, so that each step costs a header
read and a few slices."""

from __future__ import annotations

import numpy as np

from minisgl.proto.ring import RING_RESULT, RING_STEP, Ring, RingError
from minisgl.proto.step import (
    RESULT_OK,
    Logprobs,
    PromptLogprobs,
    ResultLayout,
    ResultSlot,
    StepLayout,
    StepSlot,
    StepView,
)


class StepReader:
    """Reader `reader` (the tensor-parallel rank) of a step ring."""

    def __init__(self, ring: Ring, reader: int = 0):
        if ring.kind != RING_STEP:
            raise RingError(f"ring {ring.name} is of kind {ring.kind}, not a step ring")
        self.ring = ring
        self.reader = reader
        self.layout = StepLayout(ring.capacity)
        if self.layout.slot_bytes > ring.slot_bytes:
            raise RingError(f"step slots of {ring.slot_bytes} bytes cannot hold {self.layout.slot_bytes}")
        self._slots = [StepSlot(self.layout, ring.slot(i)) for i in range(ring.slot_count)]

    def _current(self) -> StepView:
        return self._slots[self.ring.read_seq(self.reader) % self.ring.slot_count].view()

    def try_next(self) -> StepView | None:
        return None if self.ring.try_read(self.reader) is None else self._current()

    def wait(self, timeout: float | None = None) -> StepView | None:
        """The next step, or None after `timeout` seconds; raises PeerDead if the scheduler is gone. Its
        arrays point into the ring: copy them before `release()`."""
        return None if self.ring.wait_read(self.reader, timeout) is None else self._current()

    def release(self) -> None:
        """Lets the scheduler reuse the current step's slot."""
        self.ring.release(self.reader)


class ResultWriter:
    """The writer of a result ring."""

    def __init__(self, ring: Ring):
        if ring.kind != RING_RESULT:
            raise RingError(f"ring {ring.name} is of kind {ring.kind}, not a result ring")
        self.ring = ring
        self.layout = ResultLayout(ring.capacity)
        if self.layout.slot_bytes > ring.slot_bytes:
            raise RingError(f"result slots of {ring.slot_bytes} bytes cannot hold {self.layout.slot_bytes}")
        self._slots = [ResultSlot(self.layout, ring.slot(i)) for i in range(ring.slot_count)]

    def write(
        self,
        step_id: int,
        tokens: np.ndarray | None,
        status: int = RESULT_OK,
        timeout: float | None = None,
        logprobs: Logprobs | None = None,
        prompt: PromptLogprobs | None = None,
    ) -> bool:
        """Waits for a free slot, writes the result of step `step_id` (`tokens` None for a failed step; its
        `logprobs` and `prompt` logprobs when the step computed them) and publishes it. Returns False if no
        slot came free within `timeout` seconds; raises PeerDead if the scheduler is gone."""
        if self.ring.wait_claim(timeout) is None:
            return False
        self._slots[self.ring.write_seq % self.ring.slot_count].write(
            step_id, tokens, status, logprobs, prompt
        )
        self.ring.publish()
        return True
