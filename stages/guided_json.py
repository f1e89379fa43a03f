"""Schema-constrained ("guided") JSON decoding for the VLM stages, and strict validation after it.

A model answers with tokens; left alone it may wrap JSON in prose, stop half way, or (with random
weights) write noise. During generation a logits processor lets through only the tokens that keep
the text a prefix of compact JSON matching a small schema, and allows end-of-sequence only once the
object is complete. The same schema then validates the parsed answer, so guidance is a help, never
a substitute for checking.

The schema language covers what the VLM prompts need: objects with fixed, ordered, required fields;
arrays with item-count bounds; strings with a length bound (no escapes: the answers never need
them, and forbidding them keeps the automaton small); string enums; booleans; bounded integers.
Output is compact (no whitespace), which keeps the automaton deterministic between values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor


class SchemaError(ValueError):
    """The text is not JSON, or is JSON that does not match the schema."""


# Nodes compare by identity (eq=False): the automaton hashes states made of them at every step, and
# a structural hash of the whole schema there would cost more than the step itself.
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
    """Rejects schemas the automaton cannot decide without lookahead."""
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
        if not 0 <= node.lo <= node.hi:
            raise ValueError("integer bounds need 0 <= lo <= hi")
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
        return len(str(node.hi))
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


# --- the character automaton ----------------------------------------------------------------------
# A state is an immutable stack of frames (a tuple of tuples); the empty stack means "complete".
_LIT, _OBJ, _ARR_OPEN, _ARR, _STR, _ENUM, _INT = range(7)
_DIGITS = frozenset("0123456789")


def _push_value(stack: tuple, node: Any) -> tuple:
    if isinstance(node, Object):
        return stack + ((_OBJ, node, 0, False), (_LIT, '{"' + node.fields[0][0] + '":', 0))
    if isinstance(node, Array):
        return stack + ((_ARR_OPEN, node), (_LIT, "[", 0))
    if isinstance(node, Str):
        return stack + ((_STR, node, 0), (_LIT, '"', 0))
    if isinstance(node, Enum):
        return stack + ((_ENUM, tuple(f'"{v}"' for v in node.values), ""),)
    if isinstance(node, Bool):
        return stack + ((_ENUM, ("true", "false"), ""),)
    if isinstance(node, Int):
        return stack + ((_INT, node, ""),)
    raise TypeError(f"not a schema node: {node!r}")


def _settle(stack: tuple) -> tuple:
    """Applies the moves that consume no character (a finished literal, an object's next field)."""
    while stack:
        top = stack[-1]
        if top[0] == _LIT and top[2] == len(top[1]):
            stack = stack[:-1]
        elif top[0] == _OBJ:
            _, node, i, started = top
            if not started:
                stack = _push_value(stack[:-1] + ((_OBJ, node, i, True),), node.fields[i][1])
            elif i + 1 < len(node.fields):
                stack = stack[:-1] + ((_OBJ, node, i + 1, False), (_LIT, ',"' + node.fields[i + 1][0] + '":', 0))
            else:
                stack = stack[:-1] + ((_LIT, "}", 0),)
        else:
            break
    return stack


@lru_cache(maxsize=4096)
def _int_prefix_ok(lo: int, hi: int, digits: str) -> bool:
    if len(digits) > 1 and digits[0] == "0":
        return False
    return any(str(v).startswith(digits) for v in range(lo, hi + 1))


def step(stack: tuple, ch: str) -> tuple | None:
    """The state after one more character, or None when the character breaks the schema."""
    if not stack:
        return None
    top = stack[-1]
    kind = top[0]
    if kind == _LIT:
        _, text, pos = top
        if text[pos] != ch:
            return None
        return _settle(stack[:-1] + ((_LIT, text, pos + 1),))
    if kind == _STR:
        _, node, length = top
        if ch == '"':
            return _settle(stack[:-1]) if length >= node.min_len else None
        if ch == "\\" or ch < " " or length >= node.max_len:
            return None
        return stack[:-1] + ((_STR, node, length + 1),)
    if kind == _ARR_OPEN:
        node = top[1]
        if ch == "]":
            return _settle(stack[:-1]) if node.min_items == 0 else None
        if node.max_items == 0:
            return None
        return step(_push_value(stack[:-1] + ((_ARR, node, 1),), node.item), ch)
    if kind == _ARR:
        _, node, count = top
        if ch == "," and count < node.max_items:
            return _push_value(stack[:-1] + ((_ARR, node, count + 1),), node.item)
        if ch == "]" and count >= node.min_items:
            return _settle(stack[:-1])
        return None
    if kind == _ENUM:
        _, values, prefix = top
        candidate = prefix + ch
        if candidate in values:  # check_schema guarantees no value is a prefix of another
            return _settle(stack[:-1])
        if any(v.startswith(candidate) for v in values):
            return stack[:-1] + ((_ENUM, values, candidate),)
        return None
    if kind == _INT:
        _, node, digits = top
        if ch in _DIGITS:
            candidate = digits + ch
            return stack[:-1] + ((_INT, node, candidate),) if _int_prefix_ok(node.lo, node.hi, candidate) else None
        # A number ends at the first non-digit, which then belongs to the enclosing value.
        if digits and node.lo <= int(digits) <= node.hi:
            return step(_settle(stack[:-1]), ch)
        return None
    raise AssertionError(f"unknown frame {top!r}")


def initial_state(node: Any) -> tuple:
    check_schema(node)
    return _settle(_push_value((), node))


def feed(stack: tuple | None, text: str) -> tuple | None:
    for ch in text:
        if stack is None:
            return None
        stack = step(stack, ch)
    return stack


def is_valid_prefix(text: str, node: Any) -> bool:
    return feed(initial_state(node), text) is not None


# --- from characters to tokens ---------------------------------------------------------------------
_PROBE = tuple(chr(c) for c in range(0x20, 0x7F))  # every character a non-string state can accept
_NEVER = np.iinfo(np.int32).max


def token_texts(tokenizer) -> list[str | None]:
    """Each token id's text as it reads in the middle of an answer; None for tokens never allowed.

    Decoding a token alone loses what depends on context (SentencePiece drops the leading space of a
    first token), so each token is decoded after an anchor token and the anchor's text removed.
    Special tokens and byte pieces of a split character (decoded as U+FFFD) are never allowed: the
    answer is plain JSON text.
    """
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    anchor_text = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode(
        [[anchor, i] for i in range(size)], clean_up_tokenization_spaces=False, skip_special_tokens=False
    )
    texts: list[str | None] = []
    for i, pair in enumerate(pairs):
        if i in special:
            texts.append(None)
            continue
        text = pair[len(anchor_text):] if pair.startswith(anchor_text) else tokenizer.decode([i])
        texts.append(text if text and "\ufffd" not in text else None)
    return texts


class JsonGuide:
    """Which token ids may come next in a given automaton state, for one tokenizer and one schema.

    Inside a string most of the vocabulary is allowed, so that case is a vectorised comparison
    (token length against the characters left) plus the few tokens that close the string; every
    other state allows few tokens, found by folding the tokens that start with an acceptable
    character and cached per state, so a warm guide costs a dictionary lookup per row and step.
    """

    def __init__(self, texts: Sequence[str | None], schema: Any, eos_ids: Sequence[int], device: Any = "cpu"):
        self.schema = schema
        self.initial = initial_state(schema)
        self.texts = list(texts)
        self.vocab_size = len(self.texts)
        self.device = torch.device(device)
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        if self.eos_ids.numel() == 0:
            raise ValueError("guided decoding needs an end-of-sequence token id")
        plain_len = np.full(self.vocab_size, _NEVER, dtype=np.int32)
        self._closers: list[tuple[int, int, str]] = []  # (id, chars before the quote, text after it)
        self._by_first: dict[str, list[tuple[int, str]]] = {}
        for i, text in enumerate(self.texts):
            if not text:
                continue
            self._by_first.setdefault(text[0], []).append((i, text))
            cut = next((j for j, ch in enumerate(text) if ch in '"\\' or ch < " "), None)
            if cut is None:
                plain_len[i] = len(text)
            elif text[cut] == '"':
                self._closers.append((i, cut, text[cut + 1:]))
        self._plain_len = torch.from_numpy(plain_len).to(self.device)
        self._state_ids: dict[tuple, torch.Tensor] = {}
        self._closer_ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def fill(self, states: Sequence[tuple | None], allowed: torch.Tensor) -> None:
        """Sets allowed[r, id] = True for each id that may follow states[r].

        Built from a handful of batched tensor operations whatever the batch size: on a GPU, a
        kernel launch per row and step would cost as much as the decode step itself.
        """
        string_rows, lefts, needs, closer_ids, closer_before = [], [], [], [], []
        other_rows, other_ids = [], []
        for r, stack in enumerate(states):
            if not stack:  # complete, or broken beyond repair: only the end may follow
                other_rows.append(r)
                other_ids.append(self.eos_ids)
            elif stack[-1][0] == _STR:
                _, node, length = stack[-1]
                ids, before = self._closing(stack[:-1])
                string_rows.append(r)
                lefts.append(node.max_len - length)
                needs.append(node.min_len - length)
                closer_ids.append(ids)
                closer_before.append(before)
            else:
                ids = self._state_ids.get(stack)
                if ids is None:
                    ids = self._state_ids[stack] = self._fold_candidates(stack)
                other_rows.append(r)
                other_ids.append(ids)
        device = allowed.device
        if string_rows:
            rows = torch.tensor(string_rows, dtype=torch.long, device=device)
            left = torch.tensor(lefts, dtype=torch.int32, device=device)
            need = torch.tensor(needs, dtype=torch.int32, device=device)
            allowed[rows, : self.vocab_size] = self._plain_len.unsqueeze(0) <= left.unsqueeze(1)
            counts = torch.tensor([len(i) for i in closer_ids], device=device)
            before = torch.cat(closer_before)
            which = torch.repeat_interleave(torch.arange(len(string_rows), device=device), counts)
            ok = (before <= left[which]) & (before >= need[which])
            allowed[rows[which[ok]], torch.cat(closer_ids)[ok]] = True
        if other_rows:
            counts = torch.tensor([len(i) for i in other_ids], device=device)
            rows = torch.repeat_interleave(torch.tensor(other_rows, dtype=torch.long, device=device), counts)
            allowed[rows, torch.cat(other_ids)] = True

    def _closing(self, outer: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._closer_ids.get(outer)
        if cached is None:
            after = _settle(outer)
            kept = [(i, cut) for i, cut, rest in self._closers if feed(after, rest) is not None]
            ids = torch.tensor([i for i, _ in kept], dtype=torch.long, device=self.device)
            before = torch.tensor([c for _, c in kept], dtype=torch.int32, device=self.device)
            cached = self._closer_ids[outer] = (ids, before)
        return cached

    def _fold_candidates(self, stack: tuple) -> torch.Tensor:
        ids = []
        for ch in _PROBE:
            if step(stack, ch) is None:
                continue
            ids.extend(i for i, text in self._by_first.get(ch, ()) if feed(stack, text) is not None)
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.device)


class JsonLogitsProcessor(LogitsProcessor):
    """One generate call's guide: follows each row's tokens and masks what would break the schema.

    A row whose chosen token is not in the guide (it cannot happen while the mask is applied, but a
    processor placed after ours could change the choice) is left to end at once; the strict parse
    afterwards reports it.
    """

    def __init__(self, guide: JsonGuide):
        self.guide = guide
        self.states: list[tuple | None] | None = None
        self.start = 0
        self.seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if self.states is None:
            self.states = [self.guide.initial] * batch
            self.start = self.seen = input_ids.shape[1]
        new = input_ids[:, self.seen:].tolist()
        self.seen = input_ids.shape[1]
        for r in range(batch):
            for token in new[r]:
                state = self.states[r]
                if not state:  # complete or broken: the padding generate adds after the end
                    break
                text = self.guide.texts[token] if token < self.guide.vocab_size else None
                self.states[r] = feed(state, text) if text else None
        allowed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        self.guide.fill(self.states, allowed)
        return scores.masked_fill(~allowed, float("-inf"))
