"""Schema-constrained ("guided") JSON decoding for the VLM stages, and strict validation after it.

A model answers with tokens; left alone it may wrap JSON in prose, stop half way, or (with random
weights) write noise. During generation a logits processor lets through only the tokens that keep
the text a prefix of compact JSON matching a small schema, and allows end-of-sequence only once the
object is complete. The same schema then validates the parsed answer, so guidance is a help, never
a substitute for checking.

The masks come from llguidance (Microsoft's structured-generation engine, the one behind
transformers' and vLLM's guided decoding): the schema below is turned into a standard JSON Schema
and llguidance computes each step's allowed tokens lazily over a token trie, in Rust, for all rows
of a batch in parallel. bench/guided_decoding.py compares it with xgrammar, outlines-core and the
automaton this module used to hold (docs/benchmarks.md, "Constrained decoding").

The schema language covers what the VLM prompts need: objects with fixed, ordered, required fields;
arrays with item-count bounds; strings with a length bound (no escapes: the answers never need
them, and without them a character is a character of output, which keeps max_chars a true bound);
string enums; booleans; bounded integers. Output is compact (no whitespace).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor


class SchemaError(ValueError):
    """The text is not JSON, or is JSON that does not match the schema."""


# Nodes compare by identity (eq=False): compiled guides are cached per schema object, and a
# structural hash of a whole schema on every lookup would buy nothing.
@dataclass(frozen=True, eq=False)
class Str:
    max_len: int
    min_len: int = 0


@dataclass(frozen=True, eq=False)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Bool:
    pass


@dataclass(frozen=True, eq=False)
class Int:
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class Array:
    item: Any
    max_items: int
    min_items: int = 0


@dataclass(frozen=True, eq=False)
class Object:
    fields: tuple[tuple[str, Any], ...]


def _check_literal(text: str) -> None:
    if not text or any(ch in '"\\' or not (" " <= ch <= "~") for ch in text):
        raise ValueError(f"schema keys and enum values must be printable ASCII without quotes: {text!r}")


def check_schema(node: Any) -> None:
    """Rejects schemas that guided decoding could not produce (with escapes off, a key or enum value
    holding a quote cannot be written) or whose bounds are empty."""
    if isinstance(node, Object):
        if not node.fields:
            raise ValueError("an object needs at least one field")
        for key, child in node.fields:
            _check_literal(key)
            check_schema(child)
    elif isinstance(node, Array):
        if not 0 <= node.min_items <= node.max_items:
            raise ValueError("array bounds need 0 <= min_items <= max_items")
        check_schema(node.item)
    elif isinstance(node, Enum):
        for value in node.values:
            _check_literal(value)
        quoted = [f'"{v}"' for v in node.values]
        if len(set(quoted)) != len(quoted):
            raise ValueError("enum values must be distinct")
    elif isinstance(node, Int):
        if not node.lo <= node.hi:
            raise ValueError("integer bounds need lo <= hi")
    elif isinstance(node, Str):
        if not 0 <= node.min_len <= node.max_len:
            raise ValueError("string bounds need 0 <= min_len <= max_len")
    elif not isinstance(node, Bool):
        raise TypeError(f"not a schema node: {node!r}")


def max_chars(node: Any) -> int:
    """Longest compact serialisation the schema allows: a token budget that guided decoding cannot overrun."""
    if isinstance(node, Str):
        return node.max_len + 2
    if isinstance(node, Enum):
        return max(len(v) for v in node.values) + 2
    if isinstance(node, Bool):
        return 5
    if isinstance(node, Int):
        return max(len(str(node.lo)), len(str(node.hi)))
    if isinstance(node, Array):
        return 2 + node.max_items * max_chars(node.item) + max(0, node.max_items - 1)
    if isinstance(node, Object):
        return 1 + sum(len(k) + 4 + max_chars(v) for k, v in node.fields)
    raise TypeError(f"not a schema node: {node!r}")


def describe(node: Any) -> str:
    """The schema as the JSON-like template a prompt shows the model."""
    if isinstance(node, Str):
        return f"<text, at most {node.max_len} characters>"
    if isinstance(node, Enum):
        return " or ".join(f'"{v}"' for v in node.values)
    if isinstance(node, Bool):
        return "true or false"
    if isinstance(node, Int):
        return f"<integer {node.lo}-{node.hi}>"
    if isinstance(node, Array):
        return f"[{describe(node.item)}, ... at most {node.max_items} items]"
    if isinstance(node, Object):
        return "{" + ", ".join(f'"{k}": {describe(v)}' for k, v in node.fields) + "}"
    raise TypeError(f"not a schema node: {node!r}")


def validate(value: Any, node: Any, path: str = "$") -> None:
    if isinstance(node, Str):
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {type(value).__name__}")
        if not node.min_len <= len(value) <= node.max_len:
            raise SchemaError(f"{path}: string length {len(value)} outside {node.min_len}..{node.max_len}")
    elif isinstance(node, Enum):
        if value not in node.values:
            raise SchemaError(f"{path}: expected one of {list(node.values)}, got {value!r}")
    elif isinstance(node, Bool):
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected true or false, got {value!r}")
    elif isinstance(node, Int):
        # bool is an int subclass in Python, and JSON true is not a score.
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
        if not node.lo <= value <= node.hi:
            raise SchemaError(f"{path}: {value} outside {node.lo}..{node.hi}")
    elif isinstance(node, Array):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected an array, got {type(value).__name__}")
        if not node.min_items <= len(value) <= node.max_items:
            raise SchemaError(f"{path}: {len(value)} items, expected {node.min_items}..{node.max_items}")
        for i, item in enumerate(value):
            validate(item, node.item, f"{path}[{i}]")
    elif isinstance(node, Object):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected an object, got {type(value).__name__}")
        expected = [k for k, _ in node.fields]
        if sorted(value) != sorted(expected):
            raise SchemaError(f"{path}: keys {sorted(value)} differ from {sorted(expected)}")
        for key, child in node.fields:
            validate(value[key], child, f"{path}.{key}")
    else:
        raise TypeError(f"not a schema node: {node!r}")


def parse_strict(text: str, node: Any) -> dict[str, Any]:
    """The answer must be one JSON value (surrounding whitespace aside) that matches the schema."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SchemaError(f"not valid JSON: {exc}") from None
    validate(value, node)
    return value


def json_schema(node: Any) -> dict[str, Any]:
    """The node as a standard JSON Schema (what the guidance library compiles)."""
    if isinstance(node, Str):
        return {"type": "string", "minLength": node.min_len, "maxLength": node.max_len}
    if isinstance(node, Enum):
        return {"enum": list(node.values)}
    if isinstance(node, Bool):
        return {"type": "boolean"}
    if isinstance(node, Int):
        return {"type": "integer", "minimum": node.lo, "maximum": node.hi}
    if isinstance(node, Array):
        return {"type": "array", "items": json_schema(node.item), "minItems": node.min_items, "maxItems": node.max_items}
    if isinstance(node, Object):
        return {
            "type": "object",
            "properties": {k: json_schema(v) for k, v in node.fields},
            "required": [k for k, _ in node.fields],
            "additionalProperties": False,
        }
    raise TypeError(f"not a schema node: {node!r}")


# Compact output (no whitespace anywhere) and no string escapes: what the prompts show, and what
# max_chars counts.
_COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
                    "json_allowed_escapes": ""}


# --- guides for a tokenizer -----------------------------------------------------------------------

class GuideTokenizer:
    """A model's tokenizer as llguidance sees it, built once per loaded model (about a second for a
    150k vocabulary): its token bytes over the logits' full width (models pad their output layer
    past the tokenizer), the end-of-sequence ids, and which tokens are whole characters.

    Byte-fallback tokens (a fragment of a multi-byte character) are never let through: with them a
    token could add less than a character, and max_chars would stop being a token budget that
    guided decoding cannot overrun. Every character stays reachable through whole tokens.
    """

    def __init__(self, tokenizer: Any, width: int, eos_ids: Sequence[int]):
        import llguidance
        import llguidance.hf

        eos = sorted(set(int(i) for i in eos_ids))
        if not eos:
            raise ValueError("guided decoding needs an end-of-sequence token id")
        try:
            self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width, eos_token=eos)
        except ValueError as exc:  # a slow (pure Python) tokenizer: llguidance reads the Rust one
            raise ValueError(f"guided JSON needs a fast tokenizer ({type(tokenizer).__name__} is not): {exc}; "
                             "VLM_GUIDED_JSON=0 turns guidance off") from exc
        self.width = width
        self.eos_ids = eos
        whole = np.ones(width, dtype=bool)
        for i in range(width):
            piece = self.ll.decode_bytes([i])
            if piece:
                try:
                    piece.decode("utf-8")
                except UnicodeDecodeError:
                    whole[i] = False
        self.whole_chars = _pack(whole)
        only_eos = np.zeros(width, dtype=bool)
        only_eos[eos] = True
        self.only_eos = _pack(only_eos)


def _pack(allowed: np.ndarray) -> np.ndarray:
    """A boolean row as llguidance's bitmask: 32 tokens per int32, lowest bit first."""
    padded = np.zeros(-(-allowed.size // 32) * 32, dtype=bool)
    padded[: allowed.size] = allowed
    return np.packbits(padded.reshape(-1, 32), axis=1, bitorder="little").view(np.int32).ravel()


class JsonGuide:
    """One schema compiled for one GuideTokenizer; makes a fresh matcher per generated row."""

    def __init__(self, tokenizer: GuideTokenizer, schema: Any, device: Any = "cpu"):
        import llguidance

        check_schema(schema)
        self.schema = schema
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(json_schema(schema), defaults=_COMPILE_OPTIONS)
        probe = self.matcher()
        if probe.is_error():
            raise ValueError(f"llguidance refused the schema: {probe.get_error()}")
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)

    def matcher(self):
        import llguidance

        return llguidance.LLMatcher(self.tokenizer.ll, self.grammar, log_level=0)

    def accepts(self, text: str, complete: bool = False) -> bool:
        """Whether guided decoding can write text (as a whole answer, with complete=True)."""
        matcher = self.matcher()
        ok = matcher.consume_tokens(self.tokenizer.ll.tokenize_str(text)) if text else True
        return ok and not matcher.is_error() and (not complete or matcher.is_accepting())

    def refused(self, bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
        """(rows, vocab) booleans, True where a token is not allowed, on the scores' device. The
        packed rows cross to a GPU (32 times smaller than booleans) and are unpacked there."""
        if self.device.type == "cpu":
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
            return torch.from_numpy(bits == 0)
        return unpack_refused(bitmask.to(self.device, non_blocking=True), vocab, self._shifts)


def unpack_refused(words: torch.Tensor, vocab: int, shifts: torch.Tensor) -> torch.Tensor:
    """Packed int32 masks to refused-token booleans with tensor operations, on the words' device."""
    bits = (words.unsqueeze(-1) >> shifts) & 1  # the sign bit too: >> is arithmetic, & 1 keeps one bit
    return bits.view(words.shape[0], -1)[:, :vocab] == 0


_executor = None
_executor_lock = threading.Lock()


def _shared_executor():
    """llguidance's thread pool, one per process: masks for a batch's rows are computed in parallel."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()  # 80% of the CPUs, at most 32
        return _executor


class JsonLogitsProcessor(LogitsProcessor):
    """One generate call's guide: follows each row's tokens and masks what would break the schema.

    A row that ended (its end-of-sequence token, then the padding generate adds) or took a token
    the guide did not allow (it cannot happen while the mask is applied, but a processor placed
    after ours could change the choice) may only end: the strict parse afterwards reports it.
    """

    def __init__(self, guide: JsonGuide):
        self.guide = guide
        self.matchers: list | None = None
        self.seen = 0
        self.bitmask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        width = self.guide.tokenizer.width
        if scores.shape[-1] != width:
            raise ValueError(f"the guide was built for {width} logits, the model gives {scores.shape[-1]}")
        bitmask = self.masks(input_ids)
        return scores.masked_fill_(self.guide.refused(bitmask, width).to(scores.device), float("-inf"))

    def masks(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Follows the rows' new tokens; returns the packed masks of what each row may write next."""
        tokenizer = self.guide.tokenizer
        batch = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [self.guide.matcher() for _ in range(batch)]
            self.seen = input_ids.shape[1]
            self.bitmask = torch.zeros((batch, tokenizer.whole_chars.size), dtype=torch.int32,
                                       pin_memory=self.guide.device.type == "cuda")
        else:
            new = input_ids[:, self.seen:].tolist()
            self.seen = input_ids.shape[1]
            for matcher, tokens in zip(self.matchers, new):
                for token in tokens:
                    if matcher.is_stopped() or matcher.is_error():
                        break
                    matcher.consume_token(token)
        live = [(m, r) for r, m in enumerate(self.matchers) if not (m.is_stopped() or m.is_error())]
        masks = self.bitmask.numpy()
        if live:
            _shared_executor().unsafe_compute_mask_ptr(live, self.bitmask.data_ptr(), masks.shape[1] * 4, batch)
        rows = [r for _, r in live]
        masks[rows] &= tokenizer.whole_chars
        # A row with nothing left to write may only end; so may one where no whole-character token
        # fits (no real vocabulary lacks the single ASCII characters, but a mask of nothing would
        # make sampling fail on NaNs).
        ended = np.setdiff1d(np.arange(batch), rows)
        ended = np.union1d(ended, np.flatnonzero(~masks.any(axis=1)))
        masks[ended] = tokenizer.only_eos
        return self.bitmask
