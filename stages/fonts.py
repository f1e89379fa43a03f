"""The Korean-capable font every rendering stage uses, and the cleaning that keeps text renderable.

Text is only ever drawn after clean_text(): whatever the font has no glyph for is dropped first, so a
creative never shows tofu boxes.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from pathlib import Path

from PIL import ImageFont

from stages import textlayout
from stages.contract import PermanentStageError

# Bold Gothic faces first: ad copy is display text, and OCR reads heavy strokes more reliably.
NANUM_DIR = Path("/usr/share/fonts/truetype/nanum")
NANUM_CANDIDATES = (
    "NanumGothicBold.ttf",
    "NanumBarunGothicBold.ttf",
    "NanumSquareB.ttf",
    "NanumGothic.ttf",
    "NanumBarunGothic.ttf",
)
HANGUL_PROBE = "가한"  # a font without these is not Korean-capable

# Which characters are emoji, and that they are not drawn, is decided in one place for image and
# caption alike: textlayout.apply_emoji_policy.


class FontNotFoundError(RuntimeError):
    """No Korean-capable font on this machine: an installation problem, not bad input."""


def _packaged_font() -> Path | None:
    try:
        import pylopdf_fonts_ko  # optional: ships Noto Sans KR for machines without fonts-nanum
    except ImportError:
        return None
    return Path(pylopdf_fonts_ko.sans_path())


@functools.lru_cache(maxsize=8)
def _codepoints(path: str) -> frozenset[int]:
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        return frozenset()  # empty means "ask Pillow glyph by glyph"
    font = TTFont(path, lazy=True, fontNumber=0)
    try:
        cmap = font.getBestCmap() or {}
    finally:
        font.close()
    return frozenset(cmap)


def _pil_has_glyph(path: str, char: str) -> bool:
    font = load_font(64, path)
    notdef = font.getmask("\U0010fffd")  # a private-use code point: renders as the .notdef glyph
    mask = font.getmask(char)
    return not (mask.size == notdef.size and bytes(mask) == bytes(notdef))


def font_has_char(path: str, char: str) -> bool:
    points = _codepoints(path)
    if points:
        return ord(char) in points
    return _pil_has_glyph(path, char)


@functools.lru_cache(maxsize=1)
def _resolve_font_path() -> str:
    configured = os.environ.get("FONT_PATH", "").strip()
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise FontNotFoundError(f"FONT_PATH={configured} does not name a readable font file")
        _require_hangul(str(path), "FONT_PATH")
        return str(path)
    candidates = [NANUM_DIR / name for name in NANUM_CANDIDATES]
    packaged = _packaged_font()
    if packaged is not None:
        candidates.append(packaged)
    for path in candidates:
        if path.is_file():
            _require_hangul(str(path), str(path))
            return str(path)
    raise FontNotFoundError(
        "no Korean-capable font found: set FONT_PATH, install the Debian package fonts-nanum, "
        "or pip install pylopdf-fonts-ko"
    )


def _require_hangul(path: str, origin: str) -> None:
    try:
        ok = all(font_has_char(path, ch) for ch in HANGUL_PROBE)
    except Exception as exc:
        raise FontNotFoundError(f"{origin}: cannot read font {path}: {exc}") from None
    if not ok:
        raise FontNotFoundError(f"{origin}: font {path} has no Hangul glyphs")


def font_path() -> str:
    """Path of the font to render with (FONT_PATH, then fonts-nanum, then pylopdf-fonts-ko)."""
    return _resolve_font_path()


def reset_font_cache() -> None:
    """Forgets the resolved font, e.g. after FONT_PATH changed (tests, long-lived workers)."""
    _resolve_font_path.cache_clear()


@functools.lru_cache(maxsize=512)
def _load(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size)


def load_font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    return _load(path or font_path(), int(size))


_SPACES = re.compile(r"\s+")


def clean_text_report(text: object, path: str | None = None) -> tuple[str, list[str]]:
    """(cleaned text, characters dropped): NFC, one space between words, only glyphs the font has.

    Line breaks and tabs become spaces: the planner decides where lines break.
    """
    if text is None:
        raise PermanentStageError("ad copy is missing")
    if not isinstance(text, str):
        raise PermanentStageError(f"ad copy must be text, got {type(text).__name__}")
    if "\x00" in text:
        raise PermanentStageError("ad copy contains a NUL byte (U+0000); refusing corrupt text")
    path = path or font_path()
    kept: list[str] = []
    dropped: list[str] = []
    normal = unicodedata.normalize("NFC", text)
    drawn, _ = textlayout.apply_emoji_policy(normal, "image")
    if drawn != normal:
        # Reported character by character, as everything else this function drops.
        dropped.extend(ch for a, b in textlayout.emoji_spans(normal) for ch in normal[a:b])
    for ch in drawn:
        if ch.isspace():
            kept.append(" ")
            continue
        category = unicodedata.category(ch)
        if (
            category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
            or not font_has_char(path, ch)
        ):
            dropped.append(ch)
            continue
        kept.append(ch)
    cleaned = unicodedata.normalize("NFC", _SPACES.sub(" ", "".join(kept)).strip())
    return cleaned, dropped


def clean_text(text: object, path: str | None = None) -> str:
    return clean_text_report(text, path)[0]


def has_hangul(text: str) -> bool:
    return any(
        0xAC00 <= ord(ch) <= 0xD7A3 or 0x1100 <= ord(ch) <= 0x11FF or 0x3130 <= ord(ch) <= 0x318F
        for ch in text
    )
