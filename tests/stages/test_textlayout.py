"""textlayout: UAX #14 line breaking, hyphenation, Korean, balance, orphans, names and the emoji/hashtag rules."""

from __future__ import annotations

import re

import pytest

from stages import fonts, textlayout as tl


@pytest.fixture(scope="module")
def font():
    return fonts.load_font(40)


def kinds(text: str) -> dict[int, str]:
    return dict(tl.break_opportunities(text))


def fits(lines, font, width) -> bool:
    return all(font.getlength(line) <= width for line in lines)


# --- UAX #14 ----------------------------------------------------------------------------------------


def test_breaks_after_spaces_and_never_before_punctuation():
    text = "Hello, world! Big sale (today) !"
    found = kinds(text)
    assert found == {7: "space", 14: "space", 18: "space", 23: "space"}  # none before ",", "!" or ")"
    assert text.index("!", 20) - 1 not in found  # "(today) !" keeps the spaced "!" with its word


def test_breaks_after_hyphens_and_slashes_inside_a_word():
    assert kinds("co-op") == {3: "uax14"}
    assert kinds("www.example.com/shoes") == {16: "uax14"}  # after the slash, not at the dots


def test_cjk_breaks_between_ideographs_and_not_before_small_kana():
    found = kinds("東京タワー")
    assert found == {1: "uax14", 2: "uax14", 3: "uax14"}  # "ー" stays with "ワ"


def test_newline_is_a_mandatory_break(font):
    assert kinds("one\ntwo") == {4: "mandatory"}
    assert tl.wrap_text("one\n\ntwo", font, 1000) == ["one", "two"]


@pytest.mark.parametrize("price", ["$4.99", "₩5,900", "€1.299,00", "5,900원", "50%"])
def test_prices_have_no_break_inside(price):
    assert [k for k in kinds(price).values() if k != "hangul"] == []


# --- hyphenation ------------------------------------------------------------------------------------


def test_a_word_too_long_for_the_line_is_hyphenated_at_dictionary_points(font):
    word = "Supercalifragilisticexpialidocious"
    width = font.getlength(word) / 3
    result = tl.wrap(word, font, width)
    assert len(result.lines) >= 3 and fits(result.lines, font, width)
    assert all(line.endswith("-") for line in result.lines[:-1])  # the hyphen is drawn
    assert "".join(line[:-1] for line in result.lines[:-1]) + result.lines[-1] == word
    points = set(tl.hyphenation_points(word))
    offset = 0
    for line in result.lines[:-1]:
        offset += len(line) - 1
        assert offset in points
    assert result.breaks == ("hyphen",) * (len(result.lines) - 1) and not result.emergency


def test_words_that_fit_are_never_broken(font):
    """The reported "Mixe / d bag": a word that fits a line moves whole to the next one."""
    width = font.getlength("Mixed bag") - 1
    assert tl.wrap_text("Mixed bag", font, width) == ["Mixed", "bag"]
    text = "Mixed bag of refreshing summer treats for everyone"
    for width in range(int(font.getlength("refreshing")) + 1, 900, 37):
        lines = tl.wrap_text(text, font, width)
        assert " ".join(lines) == text and fits(lines, font, width)


def test_no_dictionary_point_means_a_hyphen_still_shows(font):
    word = "Zzzzzzzzzzzzzzzzzzzzzz"
    width = font.getlength(word) / 2
    result = tl.wrap(word, font, width)
    assert fits(result.lines, font, width) and all(line.endswith("-") for line in result.lines[:-1])
    assert result.emergency and "emergency" in result.breaks


def test_impossible_widths_and_amounts_are_refused(font):
    assert tl.wrap_text("WIDE", font, 5) is None
    assert tl.wrap_text("Only 1234567890123", font, font.getlength("12345")) is None  # digits never split
    assert tl.wrap_text("", font, 100) == []


# --- Korean -----------------------------------------------------------------------------------------


def test_korean_breaks_between_words(font):
    text = "오늘 새로운 신발을 50% 할인된 가격으로 만나보세요"
    widest = max(font.getlength(word) for word in text.split())
    for width in range(int(widest) + 1, 700, 41):
        lines = tl.wrap_text(text, font, width)
        assert " ".join(lines) == text, width  # every line ends at a space: no word was split
        assert fits(lines, font, width)


def test_korean_word_is_split_only_when_it_alone_does_not_fit(font):
    word = "초특급할인대잔치"
    width = font.getlength(word) * 0.6
    result = tl.wrap(f"오늘 {word}", font, width)
    assert result.lines[0] == "오늘"  # the short word is not split to fill the line
    assert "".join(result.lines[1:]) == word and fits(result.lines, font, width)
    assert "hangul" in result.breaks and not any(line.endswith("-") for line in result.lines)


# --- balance and orphans ----------------------------------------------------------------------------


def spread(lines, font):
    widths = [font.getlength(line) for line in lines]
    return max(widths) - min(widths)


def test_lines_are_balanced(font):
    text = "Fresh roasted coffee every single morning for you"
    width = font.getlength("Fresh roasted coffee every single")
    ragged = tl.wrap_text(text, font, width, balance=False)
    balanced = tl.wrap_text(text, font, width)
    assert len(balanced) == len(ragged) == 2
    assert spread(balanced, font) < spread(ragged, font) / 2
    assert " ".join(balanced) == text


def test_no_single_word_last_line_when_another_break_exists(font):
    text = "Fresh coffee every morning today"
    width = font.getlength("Fresh coffee every morning")
    result = tl.wrap(text, font, width)
    assert len(result.lines[-1].split()) > 1 and not result.orphan
    assert tl.wrap(text, font, width, balance=False).lines[-1].count(" ") >= 1
    # Where no other break exists the orphan stays, and is reported.
    forced = tl.wrap("Hello world", font, max(font.getlength("Hello"), font.getlength("world")))
    assert forced.lines == ["Hello", "world"] and forced.orphan


def test_max_lines_is_respected(font):
    text = "one two three four five six"
    assert tl.wrap_text(text, font, font.getlength("three"), max_lines=2) is None
    assert len(tl.wrap_text(text, font, font.getlength("one two three"), max_lines=3)) <= 3


# --- names and prices kept together -----------------------------------------------------------------


def test_brand_pairs_stay_together(font):
    text = "Shop the new Nike Air shoes today"
    for width in range(int(font.getlength("Nike Air")) + 1, 700, 13):
        lines = tl.wrap_text(text, font, width)
        assert any("Nike Air" in line for line in lines), (width, lines)


def test_prices_stay_together(font):
    text = "Only today ₩5,900 or $4.99 for 4,900 원 each"
    for width in range(int(font.getlength("4,900 원")) + 1, 700, 17):
        lines = tl.wrap_text(text, font, width)
        joined = "\n".join(lines)
        assert "₩5,900" in joined and "$4.99" in joined and "4,900 원" in joined, (width, lines)


def test_title_case_copy_is_balanced_like_any_other(font):
    text = "Fresh Coffee Every Morning For You"
    lines = tl.wrap_text(text, font, font.getlength("Fresh Coffee Every Morning"))
    assert len(lines) == 2 and spread(lines, font) < font.getlength("Morning")


# --- what is drawn: hashtags and the emoji policy ---------------------------------------------------


def test_image_text_leaves_hashtags_and_emoji_to_the_caption():
    text, removed = tl.image_text("Summer SALE 🔥 50% off! Love #coffee mornings. #sale #Summer ☀️\n#more")
    assert text == "Summer SALE 50% off! Love coffee mornings."
    assert removed == ["#coffee", "#sale", "#Summer", "🔥", "☀️", "#more"]
    assert "#" not in text


def test_a_rank_is_not_a_hashtag():
    assert tl.image_text("We are #1 in town")[0] == "We are #1 in town"
    assert tl.hashtags("#1 #a1 #여름 C# x#y") == ["#a1", "#여름"]


@pytest.mark.parametrize("cluster, emoji", [
    ("🔥", True), ("👍🏽", True), ("👨\u200d👩\u200d👧", True), ("🇰🇷", True), ("1\ufe0f\u20e3", True),
    ("\u2764\ufe0f", True), ("©\ufe0f", True), ("™", False), ("©", False), ("★", False), ("가", False),
])
def test_what_counts_as_an_emoji(cluster, emoji):
    assert tl.is_emoji(cluster) is emoji


def test_one_emoji_rule_for_image_caption_and_font_cleaning():
    text = "Nike™ Air 👟 for the 👨\u200d👩\u200d👧 🇰🇷 ©"
    assert tl.apply_emoji_policy(text, "caption") == (text, [])
    drawn, removed = tl.apply_emoji_policy(text, "image")
    assert removed == ["👟", "👨\u200d👩\u200d👧", "🇰🇷"] and "™" in drawn and "©" in drawn
    cleaned, dropped = fonts.clean_text_report(text)
    assert cleaned == re.sub(r"\s+", " ", drawn).strip()
    assert "".join(removed) == "".join(ch for ch in dropped if ch in "".join(removed))
    with pytest.raises(ValueError):
        tl.apply_emoji_policy(text, "story")


@pytest.mark.parametrize("copy, message", [(None, "missing"), (42, "must be text")])
def test_bad_copy_keeps_its_clear_error(copy, message):
    from stages.contract import PermanentStageError

    with pytest.raises(PermanentStageError, match=message):
        tl.image_text(copy)


def test_a_nul_byte_survives_image_text_to_be_refused():
    from stages.contract import PermanentStageError

    text, _ = tl.image_text("SALE\x00 #now")
    with pytest.raises(PermanentStageError, match="NUL"):
        fonts.clean_text_report(text)
