"""Acceptance: 32 concurrent requests give exactly the tokens each gives alone (CPU, fp32)."""

from __future__ import annotations

TOPICS = [
    "a binary search",
    "the TCP handshake",
    "photosynthesis",
    "a linked list in C",
    "the French revolution",
    "prime numbers",
    "garbage collection",
    "black holes",
]


def make_requests():
    requests = []
    for i in range(32):
        topic = TOPICS[i % len(TOPICS)]
        if i % 4 == 0:
            prompt = {"text": f"Notes on {topic}:" + " more" * i}
        else:
            prompt = {"messages": [{"role": "user", "content": f"In {i + 3} words, describe {topic}."}]}
        # Half greedy, half sampled with a seed: seeded sampling must not depend on the batch either.
        if i % 2 == 0:
            sampling = {"temperature": 0.0, "max_tokens": 16}
        else:
            sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1000 + i, "max_tokens": 16}
        requests.append((prompt, sampling))
    return requests


def test_concurrent_requests_match_solo_runs(client):
    requests = make_requests()
    alone = [client.generate(**prompt, sampling=sampling)["token_ids"] for prompt, sampling in requests]
    rids = [client.submit(**prompt, sampling=sampling, stream=False) for prompt, sampling in requests]
    together = [list(client.replies(rid))[-1]["token_ids"] for rid in rids]
    assert all(len(t) > 0 for t in alone)
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert a == t, f"request {i}: alone {a} != batched {t}"


def test_streamed_deltas_add_up_to_the_final(client):
    rid = client.submit(
        messages=[{"role": "user", "content": "Say hello in Chinese and in Japanese."}],
        sampling={"temperature": 0.0, "max_tokens": 24},
        stream=True,
    )
    replies = list(client.replies(rid))
    deltas, final = replies[:-1], replies[-1]
    assert final["type"] == "final" and deltas
    assert "".join(d["text"] for d in deltas) == final["text"]
    assert [t for d in deltas for t in d["token_ids"]] == final["token_ids"]
    assert final["completion_tokens"] == len(final["token_ids"])
