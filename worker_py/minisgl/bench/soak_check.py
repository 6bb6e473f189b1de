"""The soak test's judge (`minisgl bench soak`): what a client received against the replay of its request
alone, and which waiting requests are stuck. Pure functions and plain state, no I/O, so that a unit test can
hand them tampered streams.

Verdicts of one stream (`verdict`):

- `ok`: a complete request got exactly the replay's tokens; one the client cut short (it aborted or went away)
  got a prefix of them.
- `reordered`: the same tokens as the replay's (its prefix of the same length, when cut), in another order.
- `duplicated`: some token came more often than the replay has it.
- `lost`: the tokens are the replay's with some missing: a complete request that ended short, or a gap inside
  a cut one.
- `wrong`: anything else (other tokens, a different finish reason): the engine did not reproduce its output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

VERDICTS = ("ok", "lost", "duplicated", "reordered", "wrong")


def is_subsequence(short: Sequence, long: Sequence) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def verdict(got: Sequence, ref: Sequence, complete: bool) -> str:
    """How `got` (the tokens, or characters, one client received) relates to `ref` (the replay's). `complete`:
    the stream ran to its end; otherwise the client cut it, and a prefix of `ref` is all it may hold."""
    got, ref = list(got), list(ref)
    target = ref if complete else ref[: len(got)]
    if got == target:
        return "ok"
    if len(got) == len(target) and Counter(got) == Counter(target):
        return "reordered"
    extra = Counter(got) - Counter(ref)
    if extra:
        # More copies of the replay's own tokens; a token it never has is not a copy of anything.
        return "duplicated" if all(token in ref for token in extra) else "wrong"
    if is_subsequence(got, ref):
        return "lost"
    return "wrong"


class StuckWatch:
    """Which requests are stuck, where queueing is allowed: with more clients than the batch holds, a request
    may wait long for its first token, and that is not a fault as long as the queue moves past nobody.

    A request is stuck when, for `stuck_s` seconds, it has had no new token while either
    - it has had its first token already (a running request gets one every step; a preempted one is requeued
      first), or
    - a request sent after it has had its first token (it was passed over), or
    - nobody has had any token (the server stalled).
    Each request is counted once, whatever it does later; `stuck_for` says for how long the worst one waited.
    """

    def __init__(self, stuck_s: float):
        self.stuck_s = stuck_s
        self.live: dict[object, list] = {}  # key -> [sent, last progress, started, passed over at, counted]
        self.last_token_any = None
        self.stuck = 0
        self.stuck_for = 0.0

    def sent(self, key: object, now: float) -> None:
        self.live[key] = [now, now, False, None, False]
        if self.last_token_any is None:
            self.last_token_any = now

    def token(self, key: object, now: float) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        self.last_token_any = now
        if not entry[2]:
            entry[2] = True
            sent = entry[0]
            for other in self.live.values():
                if not other[2] and other[3] is None and other[0] < sent:
                    other[3] = now
        entry[1] = now

    def ended(self, key: object, now: float) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self._measure(entry, now)

    def _measure(self, entry: list, now: float) -> bool:
        """Whether the request is stuck at `now`, counting it the first time."""
        sent, last, started, passed_at, _ = entry
        if started:
            since = last
        else:
            # The server stalled: nobody has had a token since then (nor since it was sent).
            since = max(sent, self.last_token_any)
            if passed_at is not None:
                since = min(since, passed_at)
        waited = now - since
        if waited < self.stuck_s:
            return False
        self.stuck_for = max(self.stuck_for, waited)
        if not entry[4]:
            entry[4] = True
            self.stuck += 1
        return True

    def check(self, now: float) -> int:
        """Counts the live requests stuck at `now`; returns how many are stuck now (counted before or not)."""
        return sum(self._measure(entry, now) for entry in self.live.values())
