"""How ad copy is broken into lines and placed inside a box: one geometry for planner and overlay.

The planner sizes boxes with these functions and the overlay draws with the same ones, so the text
the planner promised to fit is exactly the text the overlay draws. The typography rules live here
too (docs/typography.md): where a line may break (Unicode UAX #14, through uniseg), Latin
hyphenation (pyphen's dictionaries), Korean kept whole per word (eojeol), balanced lines without a
single-word last line, prices and brand names kept together; and what of the copy is drawn at all
(image_text: no hashtags, and the one emoji policy shared with the caption).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

from PIL import ImageFont

from stages.contract import PermanentStageError

LINE_SPACING = 1.25  # line pitch as a multiple of the font size
PADDING_EM = 0.35  # space between the text block and its box edge (where a scrim is drawn)
ALIGNMENTS = ("left", "center", "right")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PlacedLine:
    text: str
    origin: tuple[int, int]  # left, top of the ascender line (Pillow anchor "la")


def padding(font_size: int) -> int:
    return max(2, int(math.ceil(font_size * PADDING_EM)))


def line_pitch(font: ImageFont.FreeTypeFont) -> int:
    return int(math.ceil(font.size * LINE_SPACING))


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


# --- emoji: one policy for the image and the caption -----------------------------------------------

# No colour emoji font is installed for drawing (fonts-noto-color-emoji is absent, and Pillow draws
# colour bitmap fonts only at their one fixed size), and an outline glyph is not what the writer
# meant: emoji are kept in the caption, where Instagram renders them, and left off the image.
EMOJI_ON_IMAGE = False
EMOJI_POLICY = "emoji are kept in the caption and removed from the image text, the removal recorded"
SURFACES = ("image", "caption")


def is_emoji(cluster: str) -> bool:
    """Whether a grapheme cluster is shown as an emoji (UTS #51 presentation), not as text.

    Text-presentation symbols such as ™ © ® stay text: they belong to brand names and fonts have them.
    """
    from uniseg.emoji import emoji_presentation, extended_pictographic

    codes = [ord(ch) for ch in cluster]
    if any(0x1F000 <= c <= 0x1FAFF or 0xE0020 <= c <= 0xE007F or c == 0x20E3 for c in codes):
        return True  # pictographs, flags, skin tones, keycaps, subdivision tags
    if 0xFE0F in codes:
        return True  # VS16 asks for emoji presentation
    if 0x200D in codes and any(extended_pictographic(ch) for ch in cluster):
        return True  # a ZWJ sequence of pictographs
    return any(emoji_presentation(ch) for ch in cluster)


@functools.lru_cache(maxsize=1024)
def emoji_spans(text: str) -> tuple[tuple[int, int], ...]:
    """(start, end) of every emoji grapheme cluster in text, in order."""
    if not any(ord(ch) >= 0x231A for ch in text):
        return ()  # nothing below U+231A (the first emoji-presentation character) can be one
    from uniseg.graphemecluster import grapheme_cluster_boundaries

    bounds = list(grapheme_cluster_boundaries(text))
    return tuple((a, b) for a, b in zip(bounds, bounds[1:]) if is_emoji(text[a:b]))


def apply_emoji_policy(text: str, surface: str) -> tuple[str, list[str]]:
    """(text for that surface, the emoji removed from it): the one rule for image and caption."""
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, got {surface!r}")
    keep = surface == "caption" or EMOJI_ON_IMAGE
    spans = emoji_spans(text)
    if keep or not spans:
        return text, []
    pieces, removed, last = [], [], 0
    for a, b in spans:
        pieces.append(text[last:a])
        removed.append(text[a:b])
        last = b
    pieces.append(text[last:])
    return "".join(pieces), removed


# --- hashtags: caption only ------------------------------------------------------------------------

# A tag needs a letter: "#1" is a rank, not a hashtag (Instagram ignores all-digit tags too).
HASHTAG_RE = re.compile(r"(?<![\w#&])#(\w*[^\W\d_]\w*)")


def hashtags(text: str) -> list[str]:
    """Every hashtag in text, '#' included, in order."""
    return [f"#{m.group(1)}" for m in HASHTAG_RE.finditer(text)]


def hashtag_runs(line: str) -> list[tuple[int, int, bool]]:
    """(start, end, standalone) of each run of consecutive hashtags in one line.

    A run is standalone when it stands outside the sentence: at the start or end of the line (only
    punctuation or emoji beside it), or two or more tags in a row. A single tag inside a sentence
    ("Love #coffee mornings") is a word of the sentence.
    """
    matches = list(HASHTAG_RE.finditer(line))
    runs: list[list[int]] = []
    for m in matches:
        if runs and not line[runs[-1][1]:m.start()].strip():
            runs[-1][1] = m.end()
            runs[-1][2] += 1
        else:
            runs.append([m.start(), m.end(), 1])

    def bare(piece: str) -> bool:
        piece = apply_emoji_policy(piece, "image")[0]
        return not any(ch.isalnum() for ch in piece)

    return [(a, b, count > 1 or bare(line[:a]) or bare(line[b:])) for a, b, count in runs]


def _tidy(line: str) -> str:
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r" (?=[,.!?;:)\]])", "", line)  # what removal left before punctuation
    return line.strip()


def image_text(copy: str) -> tuple[str, list[str]]:
    """(the text to draw on the image, what was left off): hashtags and emoji go to the caption only.

    A standalone hashtag run is removed; a tag used as a word inside a sentence keeps its word
    without the '#'. Emoji follow apply_emoji_policy. Line breaks in the copy are kept.
    """
    if copy is None:
        raise PermanentStageError("ad copy is missing")
    if not isinstance(copy, str):
        raise PermanentStageError(f"ad copy must be text, got {type(copy).__name__}")
    removed: list[str] = []
    lines = []
    for line in copy.split("\n"):
        pieces, last = [], 0
        for a, b, standalone in hashtag_runs(line):
            pieces.append(line[last:a])
            run = line[a:b]
            removed.extend(hashtags(run))
            if not standalone:
                pieces.append(run[1:])
            last = b
        pieces.append(line[last:])
        text, emoji = apply_emoji_policy("".join(pieces), "image")
        removed.extend(emoji)
        lines.append(_tidy(text))
    return "\n".join(line for line in lines if line), removed


# --- where a line may break --------------------------------------------------------------------------

HYPHEN = "-"  # drawn at a hyphenation break; every font has it and OCR reads it
HYPHEN_LANG = "en_US"
# What a break costs, in units of the raggedness of one entirely empty line.
BREAK_PENALTY = {
    "space": 0.0,  # between words
    "uax14": 0.05,  # other UAX #14 opportunities: after a hyphen or slash, between ideographs
    "hangul": 0.6,  # inside a Korean word: only offered when the word alone does not fit
    "hyphen": 0.4,  # at a dictionary hyphenation point: only when the word alone does not fit
    "emergency": 4.0,  # with a hyphen at a non-dictionary point: only when no dictionary point fits
    "brand": 2.0,  # between two capitalised words inside a sentence ("Nike Air")
    "price": 5.0,  # between an amount and its currency word ("4,900 원", "USD 5")
}
ORPHAN_PENALTY = 3.0  # a last line of one word, when the block has more than one line
EXTRA_LINE_PENALTY = 1.0  # one line more than the fewest possible, to avoid an orphan or a split name
_MANDATORY = "\n\r\x0b\x0c\x85\u2028\u2029"
_SUFFIXED = ("hyphen", "emergency")
_CURRENCY_WORD = re.compile(r"^(?:USD|EUR|GBP|JPY|KRW|CNY|won|dollars?|euros?|원|달러|만원|엔)$", re.IGNORECASE)
_CURRENCY_SIGN = re.compile(r"^[$€£¥₩]$|^(?:USD|EUR|GBP|JPY|KRW|CNY)$")
_LATIN_RUN = re.compile(r"[A-Za-z\u00c0-\u024f]+")


def _is_hangul(ch: str) -> bool:
    code = ord(ch)
    return 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F or 0xA960 <= code <= 0xA97F


@functools.lru_cache(maxsize=512)
def _uax14(text: str) -> tuple[tuple[int, str], ...]:
    from uniseg.linebreak import line_break_boundaries

    found = []
    for p in line_break_boundaries(text):
        if not 0 < p < len(text):
            continue
        before, after = text[p - 1], text[p]
        if before in _MANDATORY:
            kind = "mandatory"
        elif before.isspace():
            kind = "space"
        elif _is_hangul(before) or _is_hangul(after):
            kind = "hangul"  # Korean breaks between words (keep-all), so inside one it is a last resort
        else:
            kind = "uax14"
        found.append((p, kind))
    return tuple(found)


def break_opportunities(text: str) -> list[tuple[int, str]]:
    """(position, kind) where UAX #14 allows a break before text[position].

    kind: "mandatory" (after a newline), "space" (between words), "hangul" (between syllables of
    one Korean word), "uax14" (any other, e.g. after a hyphen or slash, between CJK ideographs).
    """
    return list(_uax14(text))


@functools.lru_cache(maxsize=16)
def _hyphenator(lang: str):
    import pyphen

    return pyphen.Pyphen(lang=lang, left=2, right=3)


def hyphenation_points(word: str, lang: str = HYPHEN_LANG) -> list[int]:
    """Offsets inside word where its dictionary allows a hyphen (pyphen, LibreOffice's patterns)."""
    return [int(p) for p in _hyphenator(lang).positions(word)]


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text) if w]


def _capitalised(word: str) -> bool:
    letters = word.lstrip("\"'“‘([")
    return bool(letters) and letters[0].isupper()


def _names_apply(text: str) -> bool:
    """Capitals mark names only in sentence-case copy; in Title Case or ALL CAPS they say nothing."""
    words = [w for w in _words(text) if any(ch.isalpha() for ch in w)]
    return len(words) < 3 or sum(_capitalised(w) for w in words) <= 0.7 * len(words)


def _space_kind(text: str, p: int, names: bool) -> str:
    before = text[:p].rstrip()
    after = text[p:]
    left = before.rsplit(None, 1)[-1] if before.strip() else ""
    right = after.split(None, 1)[0] if after.strip() else ""
    if (re.search(r"\d$", left) and _CURRENCY_WORD.match(right.rstrip(".,!?"))) or (
        _CURRENCY_SIGN.match(left) and re.match(r"\d", right)
    ):
        return "price"
    if names and _capitalised(left) and _capitalised(right) and left[-1:] not in ".,!?:;)":
        start = before[: len(before) - len(left)].rstrip()
        if start and start[-1] not in ".!?:":  # a sentence's first word is capitalised anyway
            return "brand"
    return "space"


@dataclass(frozen=True)
class Wrap:
    """Lines for one width, and what it took to make them."""

    lines: list[str]
    breaks: tuple[str, ...] = ()  # the kind of each line break, in order
    orphan: bool = False  # the last line is one word (only when no other break avoids it)
    cost: float = 0.0
    hyphenated: list[str] = field(default_factory=list)  # words broken at a dictionary point
    emergency: list[str] = field(default_factory=list)  # words broken with a hyphen at no dictionary point

    @property
    def split_names(self) -> int:
        return sum(kind in ("brand", "price") for kind in self.breaks)


class _Fonted:
    """Line widths for one font, cached: the same candidate lines are measured many times."""

    def __init__(self, font: ImageFont.FreeTypeFont):
        self.font = font
        self.cache: dict[str, float] = {}

    def width(self, text: str) -> float:
        if text not in self.cache:
            self.cache[text] = self.font.getlength(text)
        return self.cache[text]


def _clean_line(text: str) -> str:
    return re.sub(r"[\n\r\x0b\x0c\x85\u2028\u2029]", "", text).strip()


def _word_breaks(text: str, a: int, b: int, inner: list[tuple[int, str]], fits, lang: str) -> dict[int, str] | None:
    """The breaks offered inside the word text[a:b]: UAX #14's own, then (only for a part that does
    not fit the width) Korean syllable breaks, dictionary hyphenation, emergency hyphenation."""
    offered = {p: k for p, k in inner if k == "uax14"}

    def too_wide() -> list[tuple[int, int]]:
        cuts = [a, *sorted(offered), b]
        end_kind = lambda e: offered.get(e, "space")  # noqa: E731  (b ends the word)
        return [(s, e) for s, e in zip(cuts, cuts[1:]) if not fits(text[s:e], end_kind(e) in _SUFFIXED)]

    for level in ("hangul", "hyphen", "emergency"):
        wide = too_wide()
        if not wide:
            return offered
        for s, e in wide:
            if level == "hangul":
                for p, k in inner:
                    # Amounts stay whole: "5,900원" never breaks between the number and 원.
                    if k == "hangul" and s < p < e and not (text[p - 1].isdigit() or text[p].isdigit()):
                        offered[p] = "hangul"
                continue
            for run in _LATIN_RUN.finditer(text, s, e):
                x, y = run.span()
                if level == "hyphen":
                    points = hyphenation_points(run.group(), lang)
                else:
                    keep = 2 if y - x >= 4 else 1
                    points = list(range(keep, y - x - keep + 1))
                for offset in points:
                    offered.setdefault(x + offset, level)
    return offered if not too_wide() else None


def wrap(
    text: str,
    font: ImageFont.FreeTypeFont,
    max_width: float,
    *,
    max_lines: int | None = None,
    lang: str = HYPHEN_LANG,
    balance: bool = True,
) -> Wrap | None:
    """The copy broken into lines no wider than max_width, by the rules in the module docstring.

    Uses the fewest lines possible (one more only when that avoids an orphan or a split name), and
    among those the breaks that make the lines most even (balance=False: only the last line may be
    short). None when the copy cannot fit: a glyph, an amount, or a word even hyphenated is wider
    than max_width, or more than max_lines lines are needed.
    """
    found = _wrap_cached(text, font, float(max_width), max_lines, lang, bool(balance))
    # Copies: a caller that edits its lines must not edit what the cache hands the next caller.
    return None if found is None else replace(
        found, lines=list(found.lines), hyphenated=list(found.hyphenated), emergency=list(found.emergency)
    )


# The planner's search asks for the same copy, font and width many times over (one per candidate
# position); fonts come from fonts.load_font's cache, so the font object itself is a stable key.
@functools.lru_cache(maxsize=4096)
def _wrap_cached(
    text: str, font: ImageFont.FreeTypeFont, max_width: float, max_lines: int | None, lang: str, balance: bool
) -> Wrap | None:
    text = re.sub(r"[ \t]*[\n\r\u2028\u2029][\s]*", "\n", text.strip())  # blank lines are not lines of copy
    if not text:
        return Wrap([])
    if max_width <= 0:
        return None
    measure = _Fonted(font)

    def fits(piece: str, suffixed: bool) -> bool:
        return measure.width(_clean_line(piece) + (HYPHEN if suffixed else "")) <= max_width

    names = _names_apply(text)
    kinds: dict[int, str] = {}
    inner_of: list[tuple[int, int, list[tuple[int, str]]]] = []
    start, pending = 0, []
    for p, kind in (*_uax14(text), (len(text), "end")):
        if kind in ("space", "mandatory", "end"):
            inner_of.append((start, p, pending))
            if kind != "end":
                kinds[p] = _space_kind(text, p, names) if kind == "space" else kind
            start, pending = p, []
        else:
            pending.append((p, kind))
    for a, b, inner in inner_of:
        offered = _word_breaks(text, a, b, inner, fits, lang)
        if offered is None:
            return None
        kinds.update(offered)
    cuts = [0, *sorted(kinds), len(text)]
    kind_after = [kinds.get(c, "end") for c in cuts[1:]]
    return _best_lines(text, cuts, kind_after, measure, max_width, max_lines, balance)


def _best_lines(text, cuts, kind_after, measure, max_width, max_lines, balance) -> Wrap | None:
    """Dynamic programme over the offered breaks: fewest lines, then least raggedness + penalties."""
    n = len(cuts) - 1
    last = n - 1

    def line(i: int, j: int) -> str:
        suffix = HYPHEN if j < last and kind_after[j] in _SUFFIXED else ""
        return _clean_line(text[cuts[i]:cuts[j + 1]]) + suffix

    # Feasible lines (i..j pieces), with their widths.
    options: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # by end piece j: (i, width)
    for i in range(n):
        for j in range(i, n):
            body = _clean_line(text[cuts[i]:cuts[j + 1]])
            if measure.width(body) > max_width:
                break
            width = measure.width(line(i, j))
            if width <= max_width and line(i, j):
                options[j].append((i, width))
            if kind_after[j] == "mandatory":
                break
    fewest = [math.inf] * (n + 1)  # fewest[j + 1]: lines to set pieces 0..j
    fewest[0] = 0
    for j in range(n):
        for i, _ in options[j]:
            fewest[j + 1] = min(fewest[j + 1], fewest[i] + 1)
    if math.isinf(fewest[n]):
        return None
    least = int(fewest[n])
    if max_lines is not None and least > max_lines:
        return None
    words_from = [0] * (n + 1)  # count of space-like breaks before piece index, for orphan checks
    for j in range(n):
        words_from[j + 1] = words_from[j] + (kind_after[j] in ("space", "brand", "price", "mandatory"))

    several = words_from[n - 1] > 0  # one long word broken over lines leaves no orphan to avoid
    best: tuple[float, int, dict] | None = None
    top = least + 1 if max_lines is None else min(least + 1, max_lines)
    for count in range(least, top + 1):
        cost = [{} for _ in range(count + 1)]  # cost[k][j + 1] = (value, start of last line)
        cost[0][0] = (0.0, -1)
        for k in range(1, count + 1):
            for j in range(n):
                final = j == last
                if final and k != count:
                    continue
                for i, width in options[j]:
                    prev = cost[k - 1].get(i)
                    if prev is None:
                        continue
                    slack = (max_width - width) / max_width
                    value = prev[0] + (slack * slack if balance or not final else 0.0)
                    if not final:
                        value += BREAK_PENALTY.get(kind_after[j], 0.0)
                    elif count > 1 and several and words_from[n - 1] == words_from[i]:
                        value += ORPHAN_PENALTY
                    if (j + 1) not in cost[k] or value < cost[k][j + 1][0]:
                        cost[k][j + 1] = (value, i)
        if n not in cost[count]:
            continue
        total = cost[count][n][0] + EXTRA_LINE_PENALTY * (count - least)
        if best is None or total < best[0] - 1e-9:
            best = (total, count, cost)
    if best is None:
        return None
    total, count, cost = best
    starts, end = [], n
    for k in range(count, 0, -1):
        i = cost[k][end][1]
        starts.append((i, end - 1))
        end = i
    starts.reverse()
    lines = [line(i, j) for i, j in starts]
    breaks = tuple(kind_after[j] for _, j in starts[:-1])
    hyphenated, emergency = [], []
    for _, j in starts[:-1]:
        if kind_after[j] in _SUFFIXED:
            p = cuts[j + 1]
            word = re.search(r"\S*$", text[:p]).group() + re.match(r"\S*", text[p:]).group()
            (hyphenated if kind_after[j] == "hyphen" else emergency).append(word)
    orphan = count > 1 and several and words_from[n - 1] == words_from[starts[-1][0]]
    return Wrap(lines, breaks, orphan, round(total, 4), hyphenated, emergency)


def wrap_text(
    text: str,
    font: ImageFont.FreeTypeFont,
    max_width: float,
    *,
    max_lines: int | None = None,
    lang: str = HYPHEN_LANG,
    balance: bool = True,
) -> list[str] | None:
    """The lines of wrap(): UAX #14 breaks, hyphenation, Korean between words, balanced lines.

    Returns None when the copy cannot be set within max_width (see wrap).
    """
    result = wrap(text, font, max_width, max_lines=max_lines, lang=lang, balance=balance)
    return None if result is None else result.lines


def block_size(lines: Sequence[str], font: ImageFont.FreeTypeFont) -> tuple[int, int]:
    """Width and height of the text block (advance widths, ascender to descender)."""
    if not lines:
        return 0, 0
    width = int(math.ceil(max(font.getlength(line) for line in lines)))
    height = (len(lines) - 1) * line_pitch(font) + _line_height(font)
    return width, height


def box_size(lines: Sequence[str], font: ImageFont.FreeTypeFont) -> tuple[int, int]:
    """Size of the box that holds the block with padding on every side."""
    width, height = block_size(lines, font)
    pad = padding(font.size)
    return width + 2 * pad, height + 2 * pad


def place_lines(
    lines: Sequence[str], font: ImageFont.FreeTypeFont, box: Sequence[int], align: str = "center"
) -> list[PlacedLine]:
    """Origins of each line: block centred vertically in the box, lines aligned horizontally."""
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    x1, y1, x2, y2 = (int(v) for v in box)
    pad = padding(font.size)
    _, block_h = block_size(lines, font)
    top = y1 + pad + max(0, ((y2 - y1 - 2 * pad) - block_h) // 2)
    placed: list[PlacedLine] = []
    for i, line in enumerate(lines):
        width = font.getlength(line)
        if align == "left":
            left = x1 + pad
        elif align == "right":
            left = int(math.floor(x2 - pad - width))
        else:
            left = int(round((x1 + x2 - width) / 2))
        placed.append(PlacedLine(line, (left, top + i * line_pitch(font))))
    return placed


def ink_box(text: str, font: ImageFont.FreeTypeFont, origin: tuple[int, int]) -> Box | None:
    """Exact bounding box of the pixels Pillow inks when drawing text at origin (anchor "la")."""
    mask, offset = font.getmask2(text, mode="L", anchor="la")
    bbox = mask.getbbox()
    if bbox is None:
        return None
    ox, oy = origin[0] + offset[0], origin[1] + offset[1]
    return ox + bbox[0], oy + bbox[1], ox + bbox[2], oy + bbox[3]
