"""How ad copy is broken into lines and placed inside a box: one geometry for planner and overlay.

The planner sizes boxes with these functions and the overlay draws with the same ones, so the text
the planner promised to fit is exactly the text the overlay draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import ImageFont

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


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str] | None:
    """Greedy wrap at spaces; words wider than a line (or unspaced Korean) break between characters.

    Returns None when not even one character fits the width.
    """

    def fits(candidate: str) -> bool:
        return font.getlength(candidate) <= max_width

    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        if not word:
            continue
        joined = f"{current} {word}" if current else word
        if fits(joined):
            current = joined
            continue
        if fits(word):
            if current:
                lines.append(current)
            current = word
            continue
        prefix = f"{current} " if current else ""
        for ch in word:
            if fits(prefix + ch):
                prefix += ch
                continue
            if prefix.strip():
                lines.append(prefix.rstrip())
            prefix = ch
            if not fits(prefix):
                return None
        current = prefix
    if current:
        lines.append(current)
    return lines


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
