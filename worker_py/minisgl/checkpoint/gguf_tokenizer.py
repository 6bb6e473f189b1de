"""`tokenizer.json` and `tokenizer_config.json` from a GGUF's tokenizer metadata (byte-level BPE, GGUF model
`gpt2`): its vocabulary, merges and token types, plus the pre-tokenizer it names (`tokenizer.ggml.pre`),
which the GGUF keeps only as a name. Each known name maps to the pre-tokenizer of the upstream tokenizer.json
it came from, so that ids match HF transformers' and the Rust `tokenizers` crate's on the upstream checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minisgl.checkpoint.gguf_meta import CheckpointError, field, optional_field

# Upstream Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and trailing whitespace kept apart from the next word.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
# Llama 3's: the same, but digits in runs of up to three.
LLAMA3_SPLIT_REGEX = QWEN2_SPLIT_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def byte_level(use_regex: bool, trim_offsets: bool = False) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    }


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@dataclass(frozen=True)
class PreTokenizer:
    normalizer: dict | None
    # Before the byte-level step; that step's own (GPT-2) regex is on only when `gpt2_regex`.
    steps: tuple[dict, ...]
    gpt2_regex: bool
    tokenizer_class: str
    # A text and its ids under the upstream tokenizer: a check that the rebuilt one is that one.
    probe: tuple[str, list[int]] | None = None


PRE_TOKENIZERS = {
    "qwen2": PreTokenizer(
        {"type": "NFC"}, (split(QWEN2_SPLIT_REGEX),), False, "Qwen2Tokenizer", ("hello world", [14990, 1879])
    ),
    # SmolLM's (StarCoder's): every digit apart, then GPT-2's split.
    "smollm": PreTokenizer(None, ({"type": "Digits", "individual_digits": True},), True, "GPT2Tokenizer"),
    "llama-bpe": PreTokenizer(None, (split(LLAMA3_SPLIT_REGEX),), False, "PreTrainedTokenizerFast"),
    "gpt-2": PreTokenizer(None, (), True, "GPT2Tokenizer"),
}

# The GGUF types every added token but the two tool-call tags as CONTROL; its converter decides by the look of
# the token (`<|...|>` means control), not by upstream's flags. Upstream Qwen2.5 marks the FIM, repo and file
# markers and the tool-call tags as *not* special, so `skip_special_tokens` keeps them in decoded code, and we
# follow upstream: the checkpoint should behave like the published one, not like llama.cpp's reading of it.
NOT_SPECIAL_ADDED_TOKENS = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)
# A document's end in these vocabularies; generation stops on it as well as on the GGUF's eos (a chat turn's).
END_OF_TEXT = "<|endoftext|>"
USER_DEFINED = 4  # gguf.TokenType.USER_DEFINED, without importing gguf at module level


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]  # every token of the GGUF, by id
    bpe: list[str]  # the BPE model's vocabulary: ids 0..n-1
    added: list[tuple[int, str, int]]  # (id, text, GGUF type) of the control and user-defined tokens

    def id_of(self, text: str) -> int | None:
        return next((i for i, t, _ in self.added if t == text), None)


def read_vocabulary(reader) -> Vocabulary:
    """The BPE vocabulary runs up to the last normal token; control and user-defined tokens are added tokens
    wherever they sit (Qwen2 appends them after the vocabulary, SmolLM2 has them at its start), and unused
    fillers after the last of them are dropped (the embedding keeps their rows)."""
    import gguf

    tokens = [str(t) for t in field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in field(reader, "tokenizer.ggml.token_type")]
    normal, unused = gguf.TokenType.NORMAL, gguf.TokenType.UNUSED
    special = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    vocab_size = max(i for i, t in enumerate(types) if t == normal) + 1
    added = [(i, tokens[i], types[i]) for i in range(len(tokens)) if types[i] in special]
    for i in range(vocab_size, len(tokens)):
        if types[i] not in (*special, unused):
            raise CheckpointError(f"token {i} {tokens[i]!r} has unexpected GGUF type {types[i]}")
    # Tokens past the vocabulary must follow it without gaps, or their ids would shift once the fillers go.
    tail = [i for i, _, _ in added if i >= vocab_size]
    if tail != list(range(vocab_size, vocab_size + len(tail))):
        raise CheckpointError("the GGUF's added tokens are not contiguous after the BPE vocabulary")
    return Vocabulary(tokens, tokens[:vocab_size], added)


def pre_tokenizer_of(reader) -> PreTokenizer:
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (only gpt2: byte-level BPE)")
    pre = optional_field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {known})")
    return PRE_TOKENIZERS[pre]


def token_text(vocab: Vocabulary, reader, key: str) -> str | None:
    token_id = optional_field(reader, f"tokenizer.ggml.{key}")
    return None if token_id is None else vocab.tokens[int(token_id)]


def build_tokenizer_json(reader, vocab: Vocabulary) -> tuple[dict, list[dict]]:
    pre = pre_tokenizer_of(reader)
    merges = [merge.split(" ") for merge in field(reader, "tokenizer.ggml.merges")]
    if any(len(pair) != 2 for pair in merges):
        raise CheckpointError("a GGUF merge is not two space-separated symbols")
    added_tokens = [
        {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind != USER_DEFINED and text not in NOT_SPECIAL_ADDED_TOKENS,
        }
        for token_id, text, kind in vocab.added
    ]
    bos = token_text(vocab, reader, "bos_token_id")
    post_processor = byte_level(use_regex=False)
    if optional_field(reader, "tokenizer.ggml.add_bos_token", False):
        if bos is None:
            raise CheckpointError("the GGUF asks for a BOS token but names none")
        bos_id = int(field(reader, "tokenizer.ggml.bos_token_id"))
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": pre.normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*pre.steps, byte_level(pre.gpt2_regex)]},
        "post_processor": post_processor,
        "decoder": byte_level(use_regex=False),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(vocab.bpe)},
            "merges": merges,
        },
    }
    return tokenizer, added_tokens


def build_tokenizer_config(reader, arch: str, vocab: Vocabulary, added_tokens: list[dict]) -> dict:
    pre = pre_tokenizer_of(reader)
    add_bos = bool(optional_field(reader, "tokenizer.ggml.add_bos_token", False))
    template = optional_field(reader, "tokenizer.chat_template")
    pad = token_text(vocab, reader, "padding_token_id")
    # A BOS token is named only when something uses it: the tokenizer, or the chat template.
    bos = token_text(vocab, reader, "bos_token_id") if add_bos or "bos_token" in (template or "") else None
    decoder = {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in added_tokens
    }
    return {
        "add_bos_token": add_bos,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            t["content"] for t in added_tokens if t["special"] and t["content"] != pad
        ],
        "bos_token": bos,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": token_text(vocab, reader, "eos_token_id"),
        "errors": "replace",
        "model_max_length": int(field(reader, f"{arch}.context_length")),
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": pre.tokenizer_class,
        "unk_token": token_text(vocab, reader, "unknown_token_id"),
    }


def stop_token_ids(reader, vocab: Vocabulary) -> list[int]:
    """Generation stops on the GGUF's eos (a chat turn's end), its end-of-turn token if it names one, and the
    vocabulary's end of document (`<|endoftext|>`), which raw completions end with."""
    ids = [int(field(reader, "tokenizer.ggml.eos_token_id"))]
    eot = optional_field(reader, "tokenizer.ggml.eot_token_id")
    for candidate in (None if eot is None else int(eot), vocab.id_of(END_OF_TEXT)):
        if candidate is not None and candidate not in ids:
            ids.append(candidate)
    return ids


def check_tokenizer(reader, path: Path, added_tokens: list[dict]) -> None:
    """Load what we wrote with the same library family the Rust side uses and check the added tokens' ids,
    a lossless round trip and, where the pre-tokenizer's table has one, the upstream ids of a probe text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    for token in added_tokens:
        if tokenizer.token_to_id(token["content"]) != token["id"]:
            raise CheckpointError(f"tokenizer.json maps {token['content']!r} to the wrong id")
    sample = "Hello, world! 12345 x = f(y)\n\tcafé 中文 🙂"
    if tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False).ids) != sample:
        raise CheckpointError("tokenizer.json does not decode what it encodes back to the same text")
    probe = pre_tokenizer_of(reader).probe
    if probe is not None and tokenizer.encode(probe[0], add_special_tokens=False).ids != probe[1]:
        raise CheckpointError(f"tokenizer.json does not encode {probe[0]!r} as upstream does")
