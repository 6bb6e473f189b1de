"""The soak test's judge (minisgl.bench.soak_check, and the soak's tally over it): tampered streams are
caught, each under its own name, and the stuck watch tells a queue that moves from one that passes a request
over."""

from __future__ import annotations

import pytest

from minisgl.bench.soak import Spec, Stream, Tally, passed
from minisgl.bench.soak_check import StuckWatch, verdict

REF = [11, 12, 13, 14, 15, 16]


@pytest.mark.parametrize(
    ("got", "complete", "expected"),
    [
        (REF, True, "ok"),
        (REF[:3], False, "ok"),
        ([], False, "ok"),
        (REF[:3], True, "lost"),
        ([11, 12, 14, 15, 16], True, "lost"),
        ([11, 12, 14], False, "lost"),
        ([11, 12, 12, 13, 14, 15, 16], True, "duplicated"),
        ([11, 12, 13, 13], False, "duplicated"),
        (REF + [16], True, "duplicated"),
        ([11, 13, 12, 14, 15, 16], True, "reordered"),
        ([12, 11], False, "reordered"),
        ([11, 12, 99, 14, 15, 16], True, "wrong"),
        ([11, 12, 14, 13, 99], True, "wrong"),
    ],
)
def test_each_tampering_has_its_verdict(got, complete, expected):
    assert verdict(got, REF, complete) == expected


def make_tally_case(got: Stream) -> tuple[Tally, str]:
    spec = Spec(0, "hi", None, {"max_tokens": 6})
    ref = Stream(ids=REF, text="abcdef", finish="length", complete=True)
    tally = Tally()
    return tally, tally.add("zmq", spec, got, ref)


def test_the_tally_fails_a_run_with_one_lost_token_and_passes_it_whole():
    whole = Stream(ids=REF, text="abcdef", finish="length", complete=True)
    tally, v = make_tally_case(whole)
    assert v == "ok" and tally.verdicts["ok"] == 1 and tally.tokens == 6
    assert passed(result_of(tally))
    dropped = Stream(ids=REF[:2] + REF[3:], text="abdef", finish="length", complete=True)
    tally, v = make_tally_case(dropped)
    assert v == "lost" and tally.failures[0]["what"] == "lost"
    assert not passed(result_of(tally))


def test_the_tally_checks_the_text_finish_and_cut_of_a_stream():
    # The right ids with other text, or another finish reason: the engine did not reproduce the request.
    assert make_tally_case(Stream(ids=REF, text="abcdeX", finish="length", complete=True))[1] == "wrong"
    assert make_tally_case(Stream(ids=REF, text="abcdef", finish="stop", complete=True))[1] == "wrong"
    # Cut by the client: a prefix is right, whether the abort's final came back or the socket was closed.
    cut = Stream(ids=REF[:2], text="ab", finish="abort", complete=True, cut="abort")
    tally, v = make_tally_case(cut)
    assert (v, tally.cut, tally.complete) == ("ok", 1, 0)
    assert make_tally_case(Stream(ids=REF[:2], text="ab", cut="close"))[1] == "ok"
    # An abort that came too late: the request ran to its end, and must be whole.
    late = Stream(ids=REF[:5], text="abcde", finish="length", complete=True, cut="abort")
    assert make_tally_case(late)[1] == "lost"
    tally, v = make_tally_case(Stream(error="HTTP 503: overloaded"))
    assert (v, tally.errors) == ("error", 1)


def result_of(tally: Tally) -> dict:
    idle = {
        "requests_running": 0,
        "requests_waiting": 0,
        "kv_pages_held_by_requests": 0,
        "prefix_cache_locked_pages": 0,
        "kv_pages_pool_free": 90,
        "prefix_cache_pages": 10,
        "kv_pages_total": 100,
    }
    figures = {"verdicts": tally.verdicts, "errors": tally.errors, "stuck": 0, "clients_unfinished": 0}
    return {**figures, "after": idle}


def test_pages_not_back_fail_the_run():
    r = result_of(Tally())
    assert passed(r)
    r["after"] = {**r["after"], "kv_pages_held_by_requests": 3, "kv_pages_pool_free": 87}
    assert not passed(r)


def test_a_queued_request_is_not_stuck_while_the_queue_moves_past_nobody():
    w = StuckWatch(stuck_s=10)
    w.sent("early", 0.0)
    w.sent("queued", 1.0)
    for t in range(2, 40):  # "early" streams a token a second; "queued" waits behind it for 38 s
        w.token("early", float(t))
    assert w.check(40.0) == 0 and w.stuck == 0
    w.token("queued", 41.0)
    w.ended("queued", 41.0)
    assert w.stuck == 0


def test_a_request_passed_over_or_left_without_tokens_is_stuck_once():
    w = StuckWatch(stuck_s=10)
    w.sent("starved", 0.0)
    w.sent("later", 1.0)
    w.token("later", 2.0)  # a later request got its first token first
    for t in range(3, 12):
        w.token("later", float(t))
    assert w.check(11.0) == 0
    assert w.check(12.5) == 1 and w.stuck == 1
    assert w.check(20.0) == 1 and w.stuck == 1, "counted once"
    # A running request with no token for the threshold is stuck, whatever the others do.
    w.sent("running", 20.0)
    w.token("running", 21.0)
    w.ended("running", 31.5)
    assert w.stuck == 2 and w.stuck_for >= 10.5


def test_a_server_that_gives_nobody_a_token_leaves_every_waiting_request_stuck():
    w = StuckWatch(stuck_s=10)
    for i in range(3):
        w.sent(i, float(i))
    assert w.check(9.0) == 0
    assert w.check(12.5) == 3
