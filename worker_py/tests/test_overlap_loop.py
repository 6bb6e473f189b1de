"""The worker's step loop against a fake scheduler and runner: overlap, ordering, no deadlock, failures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from minisgl.proto.step import RESULT_FAILED, RESULT_OK, STEP_DECODE, STEP_SHUTDOWN
from minisgl.worker.loop import run_steps


class Deadlock(RuntimeError):
    pass


@dataclass
class Step:
    step_id: int
    kind: int
    req_slot: np.ndarray


class FakeScheduler:
    """Both rings at once. It publishes step k only while fewer than `ahead` published steps lack a result
    (ahead=1: it waits for each result, as a scheduler with one step in flight; ahead=2: it plans step N+1
    before it has read step N's result). After `num_steps` steps it publishes a shutdown, at once or only
    once every result is in. `delay`: how many more looks at the ring a step takes to appear after a result
    made it publishable (the scheduler's time to plan it)."""

    def __init__(self, num_steps: int, ahead: int, shutdown_early: bool = False, delay: int = 0) -> None:
        self.num_steps, self.ahead, self.shutdown_early = num_steps, ahead, shutdown_early
        self.delay, self.planning = delay, 0
        self.published = 0
        self.current: Step | None = None
        self.results: list[tuple[int, list[int], int]] = []
        self.log: list[tuple[str, int]] = []

    def _publishable(self) -> bool:
        if self.published < self.num_steps:
            return self.published - len(self.results) < self.ahead
        if self.published == self.num_steps:
            return self.shutdown_early or len(self.results) == self.num_steps
        return False

    def try_next(self) -> Step | None:
        if self.current is None and self._publishable():
            if self.planning > 0:
                self.planning -= 1
                return None
            k = self.published
            kind = STEP_DECODE if k < self.num_steps else STEP_SHUTDOWN
            self.current = Step(k, kind, np.arange(k % 3 + 1, dtype=np.int32))
            self.published += 1
        return self.current

    def wait(self, timeout: float | None = None) -> Step | None:
        for _ in range(self.delay + 1):  # a planned step appears; one that needs a result never does
            step = self.try_next()
            if step is not None:
                return step
        raise Deadlock(f"the worker waits for step {self.published}, the scheduler for a result")

    def release(self) -> None:
        assert self.current is not None
        self.current = None

    def write(self, step_id, tokens, status=RESULT_OK, timeout=None, logprobs=None, prompt=None) -> bool:
        self.log.append(("result", step_id))
        self.planning = self.delay
        self.results.append((step_id, None if tokens is None else list(tokens), status))
        return True


@dataclass
class Handle:
    step_id: int
    tokens: np.ndarray
    busy: int = 0  # how many more times `done()` says the device is still at it

    def done(self) -> bool:
        self.busy -= 1
        return self.busy < 0

    def result_logprobs(self):
        return None

    def result_prompt_logprobs(self):
        return None


class FakeRunner:
    """Each request's token is 100 * step id + its position in the step; steps named in `fail_launch` or
    `fail_collect` raise there."""

    def __init__(self, sched: FakeScheduler, fail_launch=(), fail_collect=(), busy: int = 0) -> None:
        self.sched, self.fail_launch, self.fail_collect = sched, set(fail_launch), set(fail_collect)
        self.busy = busy
        self.in_flight = 0
        self.most_in_flight = 0

    def launch(self, step: Step) -> Handle:
        self.sched.log.append(("launch", step.step_id))
        if step.step_id in self.fail_launch:
            raise RuntimeError("launch failed")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        tokens = 100 * step.step_id + np.arange(len(step.req_slot), dtype=np.int32)
        return Handle(step.step_id, tokens, self.busy)

    def collect(self, handle: Handle) -> np.ndarray:
        self.sched.log.append(("collect", handle.step_id))
        self.in_flight -= 1
        if handle.step_id in self.fail_collect:
            raise RuntimeError("collect failed")
        return handle.tokens


def expected_results(num_steps: int) -> list[tuple[int, list[int], int]]:
    return [(k, [100 * k + i for i in range(k % 3 + 1)], RESULT_OK) for k in range(num_steps)]


@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("overlap", [True, False])
def test_results_in_step_order_without_deadlock(ahead, overlap):
    sched = FakeScheduler(num_steps=7, ahead=ahead)
    runner = FakeRunner(sched)
    assert run_steps(runner, sched, sched, overlap=overlap) == 0
    assert sched.results == expected_results(7)
    assert runner.in_flight == 0


def test_overlap_launches_the_next_step_before_waiting_for_the_current_one():
    sched = FakeScheduler(num_steps=4, ahead=2)
    runner = FakeRunner(sched)
    assert run_steps(runner, sched, sched, overlap=True) == 0
    assert sched.log[:6] == [
        ("launch", 0),
        ("launch", 1),
        ("collect", 0),
        ("result", 0),
        ("launch", 2),
        ("collect", 1),
    ]
    assert runner.most_in_flight == 2


@pytest.mark.parametrize("busy, launched_behind", [(10, True), (2, False)])
def test_a_step_published_while_the_one_in_flight_runs_is_launched_behind_it(busy, launched_behind):
    """The scheduler plans step 2 once it has result 0, which takes it 5 looks at the ring: while step 1 runs
    longer than that, step 2 is launched before step 1 is awaited; else step 1 is finished first."""
    sched = FakeScheduler(num_steps=5, ahead=2, delay=5)
    runner = FakeRunner(sched, busy=busy)
    assert run_steps(runner, sched, sched, overlap=True) == 0
    assert sched.results == expected_results(5)
    after_result_0 = sched.log[4:6]
    if launched_behind:
        assert after_result_0 == [("launch", 2), ("collect", 1)]
    else:
        assert after_result_0 == [("collect", 1), ("result", 1)]


def test_without_overlap_each_step_finishes_before_the_next_launch():
    sched = FakeScheduler(num_steps=4, ahead=2)
    runner = FakeRunner(sched)
    assert run_steps(runner, sched, sched, overlap=False) == 0
    assert runner.most_in_flight == 1
    assert sched.log[:6] == [
        ("launch", 0),
        ("collect", 0),
        ("result", 0),
        ("launch", 1),
        ("collect", 1),
        ("result", 1),
    ]


def test_lockstep_scheduler_gets_each_result_before_the_worker_blocks():
    """With one step in flight on the scheduler's side, a worker that blocked for step N+1 while holding
    result N would hang both processes: the fake scheduler raises Deadlock instead."""
    sched = FakeScheduler(num_steps=5, ahead=1)
    runner = FakeRunner(sched)
    assert run_steps(runner, sched, sched, overlap=True) == 0
    assert runner.most_in_flight == 1


def test_shutdown_with_a_step_in_flight_finishes_it():
    sched = FakeScheduler(num_steps=3, ahead=2, shutdown_early=True)
    runner = FakeRunner(sched)
    assert run_steps(runner, sched, sched, overlap=True) == 0
    assert sched.results == expected_results(3)


def test_failed_launch_reports_after_the_step_before_it():
    sched = FakeScheduler(num_steps=6, ahead=2)
    runner = FakeRunner(sched, fail_launch={3})
    assert run_steps(runner, sched, sched, overlap=True) == 1
    assert sched.results[:3] == expected_results(3)
    assert sched.results[3] == (3, None, RESULT_FAILED)
    assert len(sched.results) == 4


@pytest.mark.parametrize("overlap", [True, False])
def test_failed_collect_reports_that_step_as_failed(overlap):
    sched = FakeScheduler(num_steps=6, ahead=2)
    runner = FakeRunner(sched, fail_collect={2})
    assert run_steps(runner, sched, sched, overlap=overlap) == 1
    assert sched.results[:2] == expected_results(2)
    assert sched.results[2] == (2, None, RESULT_FAILED)
    assert len(sched.results) == 3
