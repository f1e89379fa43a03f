import os
import unicodedata
from pathlib import Path

import pytest

from stages import fonts
from stages.contract import PermanentStageError

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.fixture(autouse=True)
def fresh_font_resolution():
    fonts.reset_font_cache()
    yield
    fonts.reset_font_cache()


def test_default_font_is_korean_capable():
    path = fonts.font_path()
    assert os.path.isfile(path)
    assert fonts.font_has_char(path, "한") and fonts.font_has_char(path, "A")


def test_font_path_env_wins(monkeypatch):
    nanum = fonts.NANUM_DIR / "NanumGothic.ttf"
    if not nanum.is_file():
        pytest.skip("fonts-nanum not installed")
    monkeypatch.setenv("FONT_PATH", str(nanum))
    assert fonts.font_path() == str(nanum)


def test_font_path_env_pointing_nowhere_is_an_installation_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FONT_PATH", str(tmp_path / "missing.ttf"))
    with pytest.raises(fonts.FontNotFoundError, match="FONT_PATH"):
        fonts.font_path()


@pytest.mark.skipif(not DEJAVU.is_file(), reason="DejaVu Sans not installed")
def test_font_without_hangul_is_refused(monkeypatch):
    monkeypatch.setenv("FONT_PATH", str(DEJAVU))
    with pytest.raises(fonts.FontNotFoundError, match="no Hangul"):
        fonts.font_path()


def test_packaged_font_is_the_fallback(monkeypatch, tmp_path):
    if fonts._packaged_font() is None:
        pytest.skip("pylopdf-fonts-ko not installed")
    monkeypatch.delenv("FONT_PATH", raising=False)
    monkeypatch.setattr(fonts, "NANUM_DIR", tmp_path)  # as on a machine without fonts-nanum
    assert fonts.font_path().endswith("NotoSansKR-Regular.otf")


def test_no_font_at_all_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("FONT_PATH", raising=False)
    monkeypatch.setattr(fonts, "NANUM_DIR", tmp_path)
    monkeypatch.setattr(fonts, "_packaged_font", lambda: None)
    with pytest.raises(fonts.FontNotFoundError, match="fonts-nanum"):
        fonts.font_path()


def test_cleaning_normalises_and_drops_what_cannot_be_drawn():
    decomposed = unicodedata.normalize("NFD", "여름 세일")
    assert decomposed != "여름 세일"
    text, dropped = fonts.clean_text_report(f"{decomposed}🔥 50%\u200b OFF👍🏽\t\nNOW\x07 ❤️ 🇰🇷")
    assert text == "여름 세일 50% OFF NOW"
    assert "🔥" in dropped and "\x07" in dropped and "\u200b" in dropped and "🇰" in dropped


def test_characters_missing_from_the_font_are_dropped():
    tibetan = "\u0f00"
    assert not fonts.font_has_char(fonts.font_path(), tibetan)
    assert fonts.clean_text(f"SALE {tibetan}") == "SALE"


def test_pillow_glyph_check_agrees_with_the_cmap():
    path = fonts.font_path()
    assert fonts._pil_has_glyph(path, "가")
    assert not fonts._pil_has_glyph(path, "\u0f00")


def test_nul_byte_is_refused():
    with pytest.raises(PermanentStageError, match="NUL"):
        fonts.clean_text("SALE\x00")


@pytest.mark.parametrize("value", [None, 42])
def test_non_text_copy_is_refused(value):
    with pytest.raises(PermanentStageError):
        fonts.clean_text(value)
