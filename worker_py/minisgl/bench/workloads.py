"""The requests of `minisgl bench serve`: conversations of one or more turns, built before the clock starts.

Prompts are text made of random words from a fixed list of common English words, drawn with a seeded
numpy generator, so that one run drives any server whatever its tokenizer. A space and a common word is one
token in the BPE vocabularies of current models (Qwen2's, Llama 3's, GPT-4's), so a prompt of N words is about
N tokens; the first word, without its leading space, may take two. The chat endpoint adds its template (a
system prompt, role markers: some tens of tokens); a server's `usage` reports the exact count, and the bench
reports input tokens from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD_LIST = """
    the of and to in is that it for on with as was at by be this have from or one had not but what all were
    when we there can an your which their said if do will each about how up out them then she many some so
    these would other into has more her two like him see time could no make than first been its who now
    people my made over did down only way find use may water long little very after words called just where
    most know get through back much before go good new write our used me man too any day same right look
    think also around another came come work three word must because does part even place well such here take
    why things help put years different away again off went old number great tell men say small every found
    still between name should home big give air line set own under read last never us left end along while
    might next sound below saw something thought both few those always looked show large often together asked
    house world going want school important until form food keep children feet land side without boy once
    animals life enough took sometimes four head above kind began almost live page got earth need far hand
    high year mother light parts country father let night following picture being study second eyes soon
    times story boys since white days paper hard near sentence better best across during today others however
    sure means knew try told young miles sun ways thing whole hear example heard several change answer room
    sea against top turned learn point city play toward five using himself usually money seen car morning
    body upon family later turn move face door cut done group true half red fish plants living black eat
    short run book gave order open ground cold really table remember tree course front American space inside
    ago sat farm road green river early lost wind ran idea north south east west game question fire
    field power music voice color stone paint blue ship horse bird dog cat window glass bread milk garden
    summer winter spring travel street bridge island mountain forest letter market friend teacher
"""
WORDS = tuple(_WORD_LIST.split())

# What `--token-ids` draws prompt ids from: valid in any vocabulary of at least 10,000 entries, as in
# `minisgl bench offline` (and nano-vllm's benchmark).
TOKEN_ID_RANGE = (0, 10_000)


@dataclass
class Turn:
    """One request: text, token ids (completions only), or a whole chat (from a dataset)."""

    prompt: str | list[int] | list[dict]
    max_tokens: int


@dataclass
class Conversation:
    """Turns sent one after another, each with the previous answers in its history. `system` is a shared
    prefix: the system message on the chat endpoint, the start of the text on the completions endpoint."""

    turns: list[Turn]
    system: str | None = None
    meta: dict = field(default_factory=dict)


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(np.asarray(WORDS)[rng.integers(0, len(WORDS), n)].tolist())


def lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> list[int]:
    """`n` lengths uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    lo = max(1, round(mean * (1 - ratio)))
    hi = max(lo, round(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, n).tolist()


def random_prompt(rng: np.random.Generator, n: int, token_ids: bool) -> str | list[int]:
    if token_ids:
        return rng.integers(*TOKEN_ID_RANGE, n).tolist()
    return words(rng, n)


def random_workload(
    num: int, input_len: int, output_len: int, ratio: float, seed: int, token_ids: bool = False
) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    ins, outs = lengths(rng, input_len, ratio, num), lengths(rng, output_len, ratio, num)
    return [Conversation([Turn(random_prompt(rng, i, token_ids), o)]) for i, o in zip(ins, outs, strict=True)]


def shared_prefix_workload(
    num: int,
    input_len: int,
    output_len: int,
    ratio: float,
    seed: int,
    prefix_len: int,
    num_prefixes: int = 1,
    token_ids: bool = False,
    prefix_seed: int | None = None,
) -> list[Conversation]:
    """Request i starts with prefix i % num_prefixes (`prefix_len` words) and goes on with `input_len` words
    of its own: what a prefix cache is for (a long system prompt, few-shot examples, a shared document).
    With `prefix_seed` the prefixes come from a generator of their own, so that runs of different `seed`s
    ask other questions after the same prefixes (a second round against a warm cache)."""
    rng = np.random.default_rng(seed)
    prefix_rng = rng if prefix_seed is None else np.random.default_rng(prefix_seed)
    prefixes = [random_prompt(prefix_rng, prefix_len, token_ids) for _ in range(num_prefixes)]
    ins, outs = lengths(rng, input_len, ratio, num), lengths(rng, output_len, ratio, num)
    convs = []
    for i, (n, out) in enumerate(zip(ins, outs, strict=True)):
        prefix, own = prefixes[i % num_prefixes], random_prompt(rng, n, token_ids)
        if token_ids:  # no template to put a system message in: the ids run on
            convs.append(Conversation([Turn(prefix + own, out)], meta={"prefix": i % num_prefixes}))
        else:
            convs.append(Conversation([Turn(own, out)], system=prefix, meta={"prefix": i % num_prefixes}))
    return convs


def multi_turn_workload(
    num: int, input_len: int, output_len: int, ratio: float, seed: int, turns: int
) -> list[Conversation]:
    """`num` conversations of `turns` user messages of about `input_len` words each; the client sends each
    turn with the whole history (earlier messages and answers), so the prompt grows by turn."""
    rng = np.random.default_rng(seed)
    convs = []
    for _ in range(num):
        ins, outs = lengths(rng, input_len, ratio, turns), lengths(rng, output_len, ratio, turns)
        convs.append(Conversation([Turn(words(rng, i), o) for i, o in zip(ins, outs, strict=True)]))
    return convs


def read_dataset(path: Path, output_len: int) -> list[Conversation]:
    """A JSONL file, one request a line: {"prompt": "text" | [token ids]} or {"messages": [{role, content}]}
    or {"turns": ["first user message", "second", ...]} (a multi-turn conversation), each with an optional
    "max_tokens" (default: --output-len). Blank lines are skipped."""
    convs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            max_tokens = int(row.get("max_tokens", output_len))
            if "turns" in row:
                turns = [Turn(str(t), max_tokens) for t in row["turns"]]
            elif "messages" in row:
                turns = [Turn(list(row["messages"]), max_tokens)]
            else:
                prompt = row["prompt"]
                if not isinstance(prompt, str):
                    prompt = [int(t) for t in prompt]
                turns = [Turn(prompt, max_tokens)]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{path}:{number}: not a request ({e!r}): see `minisgl bench serve --help`"
            ) from e
        if not turns:
            raise ValueError(f"{path}:{number}: no turns")
        convs.append(Conversation(turns))
    if not convs:
        raise ValueError(f"{path}: no requests")
    return convs


def take(convs: list[Conversation], num: int | None) -> list[Conversation]:
    """The first `num` conversations, going round again when there are fewer."""
    if num is None:
        return convs
    return [convs[i % len(convs)] for i in range(num)]
