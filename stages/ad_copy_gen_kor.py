"""ad_copy_gen_kor: the job's English ad copy in Korean, by a local Marian translation model.

Translation models mangle what must not change in an ad: prices, numbers, brand names, URLs and
hashtags. Those are swapped for placeholders before translating and put back afterwards; a
placeholder the model dropped is not silently lost: its text is appended, and the result says so.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

from stages.contract import PermanentStageError, StageInput, StageOutput
from stages.models import TranslatorBundle, load_translator, profile_marker, run_halving_on_oom

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


def _needs_translation(masked_line: str) -> bool:
    return bool(re.search(r"[^\W\d_]", _PLACEHOLDER_RE.sub("", masked_line)))


def translate_lines(bundle: TranslatorBundle, lines: list[str]) -> list[str]:
    import torch

    beams = int(os.environ.get("TRANSLATION_BEAMS") or 4)
    encoded = bundle.tokenizer(lines, return_tensors="pt", padding=True, truncation=True).to(bundle.model.device)
    budget = min(512, 2 * encoded["input_ids"].shape[1] + 16)
    with torch.inference_mode():
        out = bundle.model.generate(**encoded, num_beams=beams, max_new_tokens=budget, do_sample=False)
    return bundle.tokenizer.batch_decode(out, skip_special_tokens=True)


def run(inp: StageInput, profile: str | None = None, device: str = "cpu") -> StageOutput:
    source = inp.ad_copy or ""
    if not source.strip():
        raise PermanentStageError("ad_copy_gen_kor: the job has no ad copy to translate")
    bundle = load_translator(profile, device)
    masked, values = mask(source)
    lines = masked.split("\n")
    todo = [i for i, line in enumerate(lines) if _needs_translation(line)]
    if todo:
        translated = run_halving_on_oom(lambda part: translate_lines(bundle, part), [lines[i].strip() for i in todo])
        for i, text in zip(todo, translated):
            lines[i] = text
    korean, appended = unmask("\n".join(lines), values)
    result: dict[str, Any] = {
        "source": source,
        "korean": korean,
        "protected": values,
        "restored_by_append": appended,
        "model": bundle.name,
        **profile_marker(bundle.profile),
    }
    return StageOutput(result=result)


def warm(profile: str | None = None, device: str = "cpu") -> TranslatorBundle:
    return load_translator(profile, device)
