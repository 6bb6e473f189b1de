"""The worker process: load the model, shake hands with the scheduler, then run steps until told to stop."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import msgpack
import torch
import zmq

from minisgl.proto.channels import ResultWriter, StepReader
from minisgl.proto.ring import PeerDead, Ring
from minisgl.proto.step import RESULT_FAILED, RESULT_OK, STEP_SHUTDOWN
from minisgl.worker.runner import ModelRunner

log = logging.getLogger("minisgl.worker")

CPU_KV_BYTES = 1 << 30  # on the CPU there is no free-memory probe: 1 GiB of KV cache unless told otherwise


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    control: str
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    num_pages: int | None = None
    page_size: int = 16
    max_batch: int | None = None
    max_tokens: int | None = None

    def resolved(self) -> dict:
        """The runner's arguments, with every `auto` and default decided for this machine."""
        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        return {
            "model_dir": self.model,
            "device": device,
            "dtype": dtype,
            "attention": "torch" if self.attention == "auto" else self.attention,
            "num_pages": self.num_pages,
            "kv_memory_bytes": None if on_gpu or self.num_pages is not None else CPU_KV_BYTES,
            "page_size": self.page_size,
            "max_batch": self.max_batch or (256 if on_gpu else 64),
            "max_tokens": self.max_tokens or (8192 if on_gpu else 2048),
        }


def handshake(control: str, runner: ModelRunner) -> tuple[Ring, Ring]:
    """docs/protocol.md section 2: hello, welcome, map both rings, ready, ok."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(control)

    def ask(msg: dict) -> dict:
        sock.send(msgpack.packb(msg, use_bin_type=True))
        reply = msgpack.unpackb(sock.recv(), raw=False)
        if reply.get("type") == "error":
            raise RuntimeError(f"the scheduler refused the handshake: {reply.get('message')}")
        return reply

    hello = {
        "type": "hello",
        "pid": os.getpid(),
        "model": runner.model_facts(),
        "num_pages": runner.num_pages,
        "page_size": runner.page_size,
        "max_batch": runner.max_batch,
        "max_tokens": runner.max_tokens,
    }
    welcome = ask(hello)
    step_ring, result_ring = Ring.open(welcome["step_ring"]), Ring.open(welcome["result_ring"])
    step_ring.attach_reader(0, os.getpid())
    result_ring.attach_writer(os.getpid())
    ask({"type": "ready"})
    sock.close()
    return step_ring, result_ring


def serve(config: WorkerConfig) -> int:
    args = config.resolved()
    runner = ModelRunner(**args)
    log.info(
        "loaded %s on %s (%s): %d KV pages of %d tokens (%.2f GiB)",
        args["model_dir"],
        args["device"],
        args["dtype"],
        runner.num_pages,
        runner.page_size,
        runner.kv_cache.nbytes / 2**30,
    )
    step_ring, result_ring = handshake(config.control, runner)
    steps, results = StepReader(step_ring), ResultWriter(result_ring)
    try:
        # The per-step loop: a fixed number of calls whatever the batch size.
        while True:
            step = steps.wait()  # raises PeerDead when the scheduler is gone
            if step.kind == STEP_SHUTDOWN:
                log.info("the scheduler asked us to stop")
                return 0
            try:
                tokens, status = runner.run_step(step).numpy(), RESULT_OK
            except Exception:
                log.exception("step %d failed", step.step_id)
                tokens, status = None, RESULT_FAILED
            step_id = step.step_id
            del step  # its arrays point into the slot handed back now
            steps.release()
            results.write(step_id, tokens, status)
            if status != RESULT_OK:
                return 1
    except PeerDead as e:
        log.error("%s: stopping", e)
        return 1
    finally:
        step_ring.close()
        result_ring.close()
