"""The worker process: load the model, shake hands with the scheduler, then run steps until told to stop.

With tensor parallelism every rank runs this loop on the same steps: each reads the step ring as reader
`tp_rank`, runs the forward (the layers exchange what they must through torch.distributed) and samples the
same tokens, and rank 0 alone writes the results."""

from __future__ import annotations

import logging
import os

import msgpack
import torch
import zmq

from minisgl.proto import messages
from minisgl.proto.channels import ResultWriter, StepReader
from minisgl.proto.ring import PeerDead, Ring
from minisgl.proto.step import RESULT_FAILED, RESULT_OK, STEP_SHUTDOWN
from minisgl.worker import distributed
from minisgl.worker.config import WorkerConfig
from minisgl.worker.runner import ModelRunner

log = logging.getLogger("minisgl.worker")


class Control:
    """The worker's end of the control socket (docs/protocol.md section 2): status reports while the model
    loads, then hello, welcome, map both rings, ready, ok."""

    def __init__(self, address: str):
        self._sock = zmq.Context.instance().socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)

    def _ask(self, msg: dict) -> dict:
        self._sock.send(msgpack.packb(msg, use_bin_type=True))
        reply = msgpack.unpackb(self._sock.recv(), raw=False)
        if reply.get("type") == "error":
            raise RuntimeError(f"the scheduler refused the handshake: {reply.get('message')}")
        return reply

    def status(self, phase: str) -> None:
        """Tells the scheduler what is keeping us: its HTTP API reports it until we serve."""
        log.info("%s", phase)
        self._ask(messages.status(phase))

    def handshake(self, runner: ModelRunner) -> tuple[Ring, Ring | None]:
        """Says hello (every rank: the scheduler waits for all of them and checks they agree), maps the step
        ring as reader `tp_rank`, and on rank 0 the result ring as its writer; other ranks get None for it."""
        hello = messages.hello(
            pid=os.getpid(),
            model=runner.model_facts(),
            num_pages=runner.num_pages,
            page_size=runner.page_size,
            max_batch=runner.max_batch,
            max_tokens=runner.max_step_tokens,
        )
        # Left out at tp 1, so a single worker's hello is the same bytes as before tensor parallelism.
        if runner.tp_size > 1:
            hello.update(tp_rank=runner.tp_rank, tp_size=runner.tp_size)
        welcome = self._ask(hello)
        step_ring = Ring.open(welcome["step_ring"])
        step_ring.attach_reader(runner.tp_rank, os.getpid())
        result_ring = None
        if runner.tp_rank == 0:
            result_ring = Ring.open(welcome["result_ring"])
            result_ring.attach_writer(os.getpid())
        self._ask(messages.ready())
        self._sock.close()
        return step_ring, result_ring


def serve(config: WorkerConfig, control_address: str, tp_rank: int = 0, dist_init: str | None = None) -> int:
    """Runs rank `tp_rank` of `config.tp` (joined through `dist_init` when there are several)."""
    if config.tp > 1:
        if dist_init is None:
            raise ValueError(f"--tp {config.tp} needs --dist-init, the ranks' rendezvous")
        resolved = config.resolved()
        device = distributed.rank_device(resolved.device, tp_rank, config.tp)
        distributed.init(tp_rank, config.tp, dist_init, torch.device(device))
    code = _serve(config, control_address, tp_rank)
    if code == 0:
        # Only after a clean stop: tearing down NCCL while a peer is gone can block.
        distributed.close()
    return code


def _serve(config: WorkerConfig, control_address: str, tp_rank: int) -> int:
    control = Control(control_address)
    runner = ModelRunner(config, on_phase=control.status, tp_rank=tp_rank)
    c = runner.config
    log.info(
        "loaded %s%s on %s (%s, attention %s for extend and %s for decode steps, CUDA graphs %s, fused "
        "kernels %s): %d KV pages of %d tokens (%.2f GiB)",
        c.model,
        f" (rank {tp_rank} of {c.tp})" if c.tp > 1 else "",
        runner.device,
        c.dtype,
        c.attention,
        c.decode_attention,
        "on" if runner.graphs is not None else "off",
        "on" if runner.fused_kernels else "off",
        runner.num_pages,
        runner.page_size,
        runner.kv_cache.nbytes / 2**30,
    )
    step_ring, result_ring = control.handshake(runner)
    results = ResultWriter(result_ring) if result_ring is not None else NoResults()
    try:
        return run_steps(runner, StepReader(step_ring, tp_rank), results, overlap=c.overlap)
    except PeerDead as e:
        log.error("%s: stopping", e)
        return 1
    finally:
        step_ring.close()
        if result_ring is not None:
            result_ring.close()


class NoResults:
    """What ranks other than 0 write results to: they sample the same tokens as rank 0, which writes them."""

    def write(self, *_args, **_kwargs) -> bool:
        return True


def run_steps(runner, steps, results, overlap: bool = True) -> int:
    """The per-step loop: a fixed number of calls per step whatever the batch size.

    With `overlap`, step N+1 is launched before step N's ids are awaited whenever the scheduler publishes it
    while step N still runs, so the GPU goes from one step to the next without waiting for this process: the
    scheduler plans N+1 from the result of N-1, which went out just after N was launched, and the ring is
    watched until N completes. When nothing came by then, step N is finished and only then is the ring waited
    on: the scheduler may be waiting for that very result before it publishes anything. Results go out in step
    order. Returns the process's exit code; raises PeerDead when the scheduler is gone.
    """
    in_flight = None
    while True:
        step = steps.wait() if in_flight is None else _next_while_running(steps, in_flight)
        if step is None:
            ok, in_flight = _finish(runner, results, in_flight), None
            if not ok:
                return 1
            continue
        if step.kind == STEP_SHUTDOWN:
            steps.release()
            log.info("the scheduler asked us to stop")
            return 0 if in_flight is None or _finish(runner, results, in_flight, timeout=0) else 1
        step_id, launched = step.step_id, _launch(runner, step)
        del step  # its arrays point into the slot handed back now; launch copied what it needs
        steps.release()
        if in_flight is not None and not _finish(runner, results, in_flight):
            return 1
        if launched is None:
            results.write(step_id, None, RESULT_FAILED)
            return 1
        in_flight = launched
        if not overlap:
            ok, in_flight = _finish(runner, results, in_flight), None
            if not ok:
                return 1


def _next_while_running(steps, handle):
    """The next step if the scheduler publishes it before `handle`'s step completes, else None. Spins: the
    wait is at most one step's GPU time, and a sleep would add its wake-up to the step it delays."""
    while True:
        step = steps.try_next()
        if step is not None or handle.done():
            return step


def _launch(runner, step):
    try:
        return runner.launch(step)
    except Exception:
        log.exception("step %d failed", step.step_id)
        return None


def _finish(runner, results, handle, timeout: float | None = None) -> bool:
    """Waits for a launched step and writes its result (or its failure); False when it failed."""
    try:
        tokens = runner.collect(handle)
    except Exception:
        log.exception("step %d failed", handle.step_id)
        results.write(handle.step_id, None, RESULT_FAILED, timeout=timeout)
        return False
    results.write(
        handle.step_id,
        tokens,
        RESULT_OK,
        timeout=timeout,
        logprobs=handle.result_logprobs(),
        prompt=handle.result_prompt_logprobs(),
    )
    return True
