"""ad_copy_gen_kor: the job's English ad copy in Korean, by a local Marian translation model.

Translation models mangle what must not change in an ad: prices, numbers, brand names, URLs and
hashtags. Those are swapped for placeholders before translating and put back afterwards; a
placeholder the model dropped is not silently lost: its text is appended, and the result says so.

The model sees one sentence at a time (UAX #29 boundaries), and a sentence longer than the model's
own input limit (read from its config and tokenizer) is split at clause, then word boundaries, never
truncated. A word that alone exceeds the limit fails the job at once, with the numbers recorded.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from stages.contract import PermanentStageError, StageInput, StageOutput
from stages.models import TranslatorBundle, load_translator, profile_marker, run_halving_on_oom

log = logging.getLogger(__name__)

PLACEHOLDER = "ZQX{}"
# Models sometimes space out or re-case a placeholder they copied.
_PLACEHOLDER_RE = re.compile(r"Z\s*Q\s*X\s*(\d+)", re.IGNORECASE)
_TOKEN_RE = re.compile(
    r"(?P<url>(?:https?://|www\.)\S+)"
    r"|(?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)"
    r"|(?P<tag>[#@]\w+)"
    r"|(?P<number>[$€£¥₩]?\d+(?:[.,/:]\d+)*(?:%|원)?)"
    r"|(?P<words>\b[A-Z][A-Za-z0-9&-]*(?:[ \t]+[A-Z][A-Za-z0-9&-]*)*)"
)
_URL_TRAILING = ".,!?;:)]}'\""
_SENTENCE_END = ".!?:;\n"
# Capitalised because they open a sentence, not because they name a brand.
_SENTENCE_STARTERS = frozenset(
    "a an the this that these our your my get shop buy try discover meet order visit enjoy find save "
    "join introducing new now don't do make take see feel love start grab treat upgrade explore "
    "experience celebrate say give".split()
)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _is_all_caps(word: str) -> bool:
    letters = [c for c in word if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _title_case_line(line: str) -> bool:
    """In Title Case copy, a capital letter says nothing about brands."""
    words = _WORD_RE.findall(line)
    return len(words) >= 3 and sum(w[0].isupper() for w in words) > 0.7 * len(words)


def _protected_words(text: str, start: int, words: list[tuple[int, int]], title_case: bool) -> list[tuple[int, int]]:
    before = text[:start].rstrip(" \t")
    sentence_start = not before or before[-1] in _SENTENCE_END
    keep = []
    for k, (a, b) in enumerate(words):
        word = text[a:b]
        if _is_all_caps(word):
            keep.append(True)
        elif title_case or word == "I":
            keep.append(False)
        elif k == 0 and sentence_start:
            keep.append(len(words) > 1 and word.lower() not in _SENTENCE_STARTERS)
        else:
            keep.append(True)
    spans: list[tuple[int, int]] = []
    previous_kept = False
    for (a, b), kept in zip(words, keep):
        if kept and previous_kept:
            spans[-1] = (spans[-1][0], b)  # consecutive names stay one token: "Nike Air Max"
        elif kept:
            spans.append((a, b))
        previous_kept = kept
    return spans


def protected_spans(text: str) -> list[tuple[int, int]]:
    """Character spans to keep verbatim, in order, not overlapping."""
    spans: list[tuple[int, int]] = []
    title_lines = {}
    for match in _TOKEN_RE.finditer(text):
        kind, (a, b) = match.lastgroup, match.span()
        if kind == "url":
            while b > a and text[b - 1] in _URL_TRAILING:
                b -= 1
            spans.append((a, b))
        elif kind == "words":
            line_start = text.rfind("\n", 0, a) + 1
            if line_start not in title_lines:
                line_end = text.find("\n", a)
                title_lines[line_start] = _title_case_line(text[line_start: line_end if line_end >= 0 else len(text)])
            words = [m.span() for m in re.finditer(r"[A-Za-z0-9&-]+", match.group())]
            words = [(a + x, a + y) for x, y in words]
            spans.extend(_protected_words(text, a, words, title_lines[line_start]))
        else:
            spans.append((a, b))
    return spans


def mask(text: str) -> tuple[str, list[str]]:
    """The text with each protected token replaced by a placeholder, and the tokens (distinct, in order)."""
    values: list[str] = []
    pieces: list[str] = []
    last = 0
    for a, b in protected_spans(text):
        value = text[a:b]
        if value not in values:
            values.append(value)
        pieces.append(text[last:a])
        pieces.append(PLACEHOLDER.format(values.index(value)))
        last = b
    pieces.append(text[last:])
    return "".join(pieces), values


def unmask(text: str, values: Sequence[str]) -> tuple[str, list[str]]:
    """Puts the protected tokens back; returns the text and the tokens that had to be appended."""
    seen: set[int] = set()

    def restore(match: re.Match) -> str:
        index = int(match.group(1))
        if index >= len(values):
            return ""  # a placeholder the model invented stands for nothing
        seen.add(index)
        return values[index]

    restored = _PLACEHOLDER_RE.sub(restore, text)
    missing = [v for i, v in enumerate(values) if i not in seen]
    if missing:
        restored = " ".join([restored.rstrip(), *missing]).strip()
    return restored, missing


def _restore(masked: str, values: Sequence[str]) -> str:
    """A piece of the masked text as the writer wrote it (for messages; nothing appended)."""
    def value(match: re.Match) -> str:
        index = int(match.group(1))
        return values[index] if index < len(values) else match.group(0)

    return _PLACEHOLDER_RE.sub(value, masked)


def _needs_translation(masked_line: str) -> bool:
    return bool(re.search(r"[^\W\d_]", _PLACEHOLDER_RE.sub("", masked_line)))


# --- the model's limits and the chunks that respect them ------------------------------------------

# Tokenizers without a configured limit report this huge sentinel (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**9
# What cutting a too-long sentence costs at each kind of gap between words, against CHUNK_COST for
# each extra chunk: after clause punctuation it is free, before a conjunction nearly so, elsewhere dear.
_CLAUSE_END = re.compile(r"[,;:\u2013\u2014)]$")
_CONJUNCTION = re.compile(r"(?:and|but|or|so|because|while|when|if|although|though|yet|whereas|which|who)\b", re.I)
CUT_COST = {"clause": 0.0, "conjunction": 1.0, "word": 4.0}
CHUNK_COST = 2.0
LONE_WORD_COST = 1.5  # a word translated alone has no context at all


@dataclass(frozen=True)
class Limits:
    source_tokens: int  # longest input the encoder takes, end-of-sequence token included
    output_tokens: int  # most tokens the decoder may generate after its start token
    origin: str  # the settings they were read from


def model_limits(bundle: TranslatorBundle) -> Limits:
    """The translation model's own length limits, read from its config and tokenizer."""
    config = bundle.model.config
    candidates = {}
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        candidates["config.max_position_embeddings"] = positions
    tokenizer_max = getattr(bundle.tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _NO_LIMIT:
        candidates["tokenizer.model_max_length"] = tokenizer_max
    if not candidates:
        raise PermanentStageError(
            "ad_copy_gen_kor: the translation model states no length limit (neither "
            "config.max_position_embeddings nor tokenizer.model_max_length): refusing to guess one",
            {"model": bundle.name},
        )
    origin, limit = min(candidates.items(), key=lambda kv: kv[1])
    # The decoder's start token takes the first position, so one fewer token can be generated.
    return Limits(source_tokens=limit, output_tokens=max(1, limit - 1), origin=origin)


def token_count(bundle: TranslatorBundle, text: str) -> int:
    return len(bundle.tokenizer(text, truncation=False)["input_ids"])


def sentences(line: str) -> list[str]:
    """The line's sentences (Unicode sentence boundaries, UAX #29), whitespace kept with each."""
    from uniseg.sentencebreak import sentences as uax29_sentences

    return [s for s in uax29_sentences(line) if s]


class _TooLong(Exception):
    def __init__(self, word: str, tokens: int):
        self.word, self.tokens = word, tokens


def _cut_kind(word: str, following: str) -> str:
    if _CLAUSE_END.search(word.rstrip()):
        return "clause"
    return "conjunction" if _CONJUNCTION.match(following) else "word"


def split_to_fit(text: str, fits, count) -> list[str]:
    """text in consecutive pieces that each fit, cut only between words: the fewest pieces, cut at
    clause boundaries, then before conjunctions, rather than at any other gap (CUT_COST, CHUNK_COST).

    A single word that alone does not fit raises _TooLong: cutting inside a word would change it.
    """
    if fits(text):
        return [text]
    words = re.findall(r"\S+\s*", text)
    for word in words:
        if not fits(word):
            raise _TooLong(word.strip(), count(word))
    m = len(words)
    cuts = [CUT_COST[_cut_kind(words[i], words[i + 1])] for i in range(m - 1)]
    best: list[tuple[float, int]] = [(0.0, -1)] + [(math.inf, -1)] * m  # best[j]: words[:j] set in pieces
    for j in range(1, m + 1):
        for i in range(j - 1, -1, -1):
            if not fits("".join(words[i:j])):
                break  # a longer span only has more tokens
            value = best[i][0] + CHUNK_COST + (cuts[j - 1] if j < m else 0.0) + (LONE_WORD_COST if j - i == 1 else 0.0)
            if value < best[j][0]:
                best[j] = (value, i)
    pieces, j = [], m
    while j > 0:
        i = best[j][1]
        pieces.append("".join(words[i:j]))
        j = i
    return pieces[::-1]


def _chunks(
    bundle: TranslatorBundle, lines: list[str], limits: Limits, values: Sequence[str]
) -> list[tuple[int, str, int]]:
    """(line index, chunk, its token count) for every chunk to translate: sentence by sentence, split
    further only where a sentence exceeds the model's input limit."""
    counted: dict[str, int] = {}

    def count(text: str) -> int:
        text = text.strip()
        if text not in counted:
            counted[text] = token_count(bundle, text)
        return counted[text]

    def fits(text: str) -> bool:
        return count(text) <= limits.source_tokens

    chunks: list[tuple[int, str, int]] = []
    number = 0
    for index, line in enumerate(lines):
        if not _needs_translation(line):
            continue
        for sentence in sentences(line.strip()):
            number += 1
            try:
                pieces = split_to_fit(sentence, fits, count)
            except _TooLong as exc:
                word = _restore(exc.word, values)
                raise PermanentStageError(
                    f"ad_copy_gen_kor: sentence {number} has a word of {exc.tokens} tokens, over the translation "
                    f"model's limit of {limits.source_tokens} ({limits.origin}); it cannot be split without "
                    "changing it, so retrying cannot help",
                    {"sentence_number": number, "sentence": _restore(sentence.strip(), values), "word": word,
                     "tokens": exc.tokens, "sentence_tokens": count(sentence), "limit": limits.source_tokens,
                     "limit_from": limits.origin, "model": bundle.name},
                ) from None
            chunks.extend((index, piece.strip(), count(piece)) for piece in pieces if piece.strip())
    return chunks


@dataclass
class _Translated:
    text: str
    generated: int  # tokens generated, its end-of-sequence token included
    budget: int  # the most it was allowed to generate


def translate_lines(bundle: TranslatorBundle, lines: list[str], limits: Limits | None = None) -> list[str]:
    return [t.text for t in _translate(bundle, lines, limits or model_limits(bundle))]


def _translate(bundle: TranslatorBundle, chunks: list[str], limits: Limits) -> list[_Translated]:
    import torch

    beams = int(os.environ.get("TRANSLATION_BEAMS") or 4)
    # Never truncation=True: a chunk over the limit is split before it gets here, not cut.
    encoded = bundle.tokenizer(chunks, return_tensors="pt", padding=True, truncation=False).to(bundle.model.device)
    longest = int(encoded["input_ids"].shape[1])
    if longest > limits.source_tokens:
        raise PermanentStageError(
            f"ad_copy_gen_kor: a chunk of {longest} tokens reached the model, over its limit of "
            f"{limits.source_tokens} ({limits.origin})",
            {"tokens": longest, "limit": limits.source_tokens, "chunks": chunks, "model": bundle.name},
        )
    budget = min(limits.output_tokens, 2 * longest + 16)
    try:
        with torch.inference_mode():
            out = bundle.model.generate(**encoded, num_beams=beams, max_new_tokens=budget, do_sample=False)
    except (IndexError, ValueError) as exc:
        # Same input, same model, same failure: retrying cannot help, so the job learns at once.
        raise PermanentStageError(
            f"ad_copy_gen_kor: the translation model failed on a batch of {len(chunks)} chunks "
            f"(longest {longest} tokens, limit {limits.source_tokens}): {type(exc).__name__}: {exc}",
            {"error": f"{type(exc).__name__}: {exc}", "tokens": longest, "limit": limits.source_tokens,
             "limit_from": limits.origin, "chunks": chunks, "model": bundle.name},
        ) from exc
    texts = bundle.tokenizer.batch_decode(out, skip_special_tokens=True)
    pad = bundle.tokenizer.pad_token_id
    # Row 0 is the decoder's start token; shorter rows of the batch are padded after their end.
    return [_Translated(text, sum(1 for t in row[1:].tolist() if t != pad), budget) for text, row in zip(texts, out)]


def run(inp: StageInput, profile: str | None = None, device: str = "cpu") -> StageOutput:
    source = inp.ad_copy or ""
    if not source.strip():
        raise PermanentStageError("ad_copy_gen_kor: the job has no ad copy to translate")
    bundle = load_translator(profile, device)
    limits = model_limits(bundle)
    masked, values = mask(source)
    lines = masked.split("\n")
    chunks = _chunks(bundle, lines, limits, values)
    # A chunk of only prices, tags or names ("ZQX0 ZQX1.") stays as written: the model would only mangle it.
    todo = [c for _, c, _ in chunks if _needs_translation(c)]
    done_by_chunk = {}
    if todo:
        done_by_chunk = dict(zip(todo, run_halving_on_oom(lambda part: _translate(bundle, part, limits), todo)))
    by_line: dict[int, list[str]] = {}
    length_limited = []
    for number, (index, chunk, _) in enumerate(chunks, 1):
        done = done_by_chunk.get(chunk)
        by_line.setdefault(index, []).append(chunk if done is None else done.text.strip())
        if done is not None and done.generated >= done.budget:
            # Generation stopped at its budget, not at an end-of-sentence: said, not hidden.
            length_limited.append({"chunk": number, "source": _restore(chunk, values),
                                   "generated_tokens": done.generated, "budget": done.budget})
    if length_limited:
        log.warning(
            "ad_copy_gen_kor: %d of %d chunks stopped at the generation budget", len(length_limited), len(chunks)
        )
    for index, parts in by_line.items():
        lines[index] = " ".join(p for p in parts if p)
    korean, appended = unmask("\n".join(lines), values)
    result: dict[str, Any] = {
        "source": source,
        "korean": korean,
        "protected": values,
        "restored_by_append": appended,
        "model": bundle.name,
        "chunks": len(chunks),
        "chunk_sources": [_restore(c, values) for _, c, _ in chunks],
        "chunk_tokens": [n for _, _, n in chunks],
        "token_limit": limits.source_tokens,
        "token_limit_from": limits.origin,
        "length_limited": length_limited,
        **profile_marker(bundle.profile),
    }
    return StageOutput(result=result)


def warm(profile: str | None = None, device: str = "cpu") -> TranslatorBundle:
    return load_translator(profile, device)
