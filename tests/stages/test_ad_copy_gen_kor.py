"""ad_copy_gen_kor: what is protected from translation, and that it survives the model."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import pytest

from stages import ad_copy_gen_kor as kor
from stages.contract import PermanentStageError, StageOutput
from tests.stages.model_env import clean_stage_env, stage_input

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_stage_env(monkeypatch)


@pytest.mark.parametrize("text, protected", [
    ("Get 50% off the new Nike Air shoes at www.example.com. #sale",
     ["50%", "Nike Air", "www.example.com", "#sale"]),
    ("Shop Nike now! Only $4.99 at https://shop.example.com/a?b=1, mail hi@example.com",
     ["Nike", "$4.99", "https://shop.example.com/a?b=1", "hi@example.com"]),
    ("SALE: 10,000원 for 24/7 coffee @cafe", ["SALE", "10,000원", "24/7", "@cafe"]),
    ("Samsung Galaxy S24 is here. Apple's iPhone 15 too.", ["Samsung Galaxy S24", "15"]),
    ("Fresh Coffee Every Morning For You", []),  # Title Case says nothing about brands
    ("The best coffee in town", []),
])
def test_protected_tokens(text, protected):
    assert kor.mask(text)[1] == protected


def test_mask_and_unmask_round_trip():
    text = "Get 50% off Nike Air at www.example.com. Nike Air is #1 #sale"
    masked, values = kor.mask(text)
    assert "Nike" not in masked and "50" not in masked and masked.count("ZQX1") == 2  # one value, one placeholder
    assert kor.unmask(masked, values) == (text, [])


def test_placeholders_the_model_reshaped_are_restored():
    values = ["Nike", "$4.99"]
    assert kor.unmask("zqx 0 신발 Z Q X1", values) == ("Nike 신발 $4.99", [])


def test_dropped_placeholders_are_appended_not_lost():
    korean, appended = kor.unmask("새 신발 ZQX1 ZQX7", ["Nike", "$4.99", "#sale"])
    assert appended == ["Nike", "#sale"]
    assert korean == "새 신발 $4.99 Nike #sale"  # the invented ZQX7 stands for nothing


def test_tiny_translation_keeps_every_protected_token():
    copy = "Get 50% off the new Nike Air shoes at www.example.com\n#sale #summer"
    out = kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy=copy), profile="tiny")
    assert isinstance(out, StageOutput)
    result = out.result
    assert result["profile"] == "tiny" and "not meaningful" in result["warning"]
    assert result["source"] == copy and result["model"].startswith("tiny-marian")
    assert result["protected"] == ["50%", "Nike Air", "www.example.com", "#sale", "#summer"]
    for token in result["protected"]:
        assert token in result["korean"]
    # The hashtag line needs no model and stays where it was; what the model dropped is listed.
    assert "\n#sale #summer" in result["korean"]
    assert set(result["restored_by_append"]) <= {"50%", "Nike Air", "www.example.com"}
    assert "ZQX" not in result["korean"].upper()


def test_translation_is_deterministic():
    inp = stage_input("ad_copy_gen_kor", variant=None, ad_copy="Fresh coffee every morning for $4.99")
    assert kor.run(inp, profile="tiny").result == kor.run(inp, profile="tiny").result


def test_empty_copy_is_permanent():
    with pytest.raises(PermanentStageError, match="no ad copy"):
        kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy="  \n"), profile="tiny")
