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


# --- long copy within the model's own limits ---------------------------------------------------------

LONG_PARAGRAPH = (
    "Meet the new Trail Runner from Nike Air, built for long mornings on wet roads and dusty paths. "
    "The upper breathes, the sole grips, and the laces stay tied while you climb, sprint or simply walk "
    "the dog before work. Order today for only $89.99, with free delivery across Korea, easy returns "
    "within thirty days and a gift for every first order! Visit www.example.com now."
)
SMALL_LIMIT = 32


def _tiny_checkpoint(folder, positions: int, tokenizer_max: int | None = None) -> str:
    """A random-weight Marian saved like a hub checkpoint, with a small position limit of its own."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from stages.models import _tiny_translator

    tokenizer = _tiny_translator("cpu").tokenizer
    if tokenizer_max is not None:
        tokenizer.model_max_length = tokenizer_max
    config = MarianConfig(
        vocab_size=len(tokenizer.get_vocab()), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MarianMTModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("marian-32"), SMALL_LIMIT)


@pytest.fixture
def small(monkeypatch, small_model):
    monkeypatch.setenv("TRANSLATION_MODEL", small_model)
    monkeypatch.setenv("TRANSLATION_BEAMS", "1")
    return small_model


def test_the_small_model_really_fails_past_its_limit(small):
    """What the job hit: the whole paragraph in one call indexes past the position table."""
    from stages.models import load_translator

    bundle = load_translator("real")
    encoded = bundle.tokenizer([LONG_PARAGRAPH], return_tensors="pt")
    assert encoded["input_ids"].shape[1] > 3 * SMALL_LIMIT
    with pytest.raises(IndexError):
        bundle.model.generate(**encoded, max_new_tokens=4)


def test_limits_are_read_from_the_model(small, tmp_path):
    from stages.models import load_translator

    limits = kor.model_limits(load_translator("real"))
    assert (limits.source_tokens, limits.output_tokens, limits.origin) == (32, 31, "config.max_position_embeddings")
    stricter = _tiny_checkpoint(tmp_path / "m", positions=64, tokenizer_max=20)
    from stages.models import TranslatorBundle
    from transformers import AutoTokenizer, MarianMTModel

    bundle = TranslatorBundle(MarianMTModel.from_pretrained(stricter), AutoTokenizer.from_pretrained(stricter),
                              "stricter", "real", "cpu")
    assert kor.model_limits(bundle).source_tokens == 20
    assert kor.model_limits(bundle).origin == "tokenizer.model_max_length"


def test_long_paragraph_is_translated_in_chunks_within_the_limit(small):
    out = kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy=LONG_PARAGRAPH), profile="real")
    result = out.result
    assert result["token_limit"] == SMALL_LIMIT and result["profile"] == "real"
    sources = result["chunk_sources"]
    # More chunks than sentences: the long sentences had to be split further. That the run finished
    # at all shows each chunk stayed under the limit: this model raises IndexError past it.
    assert len(kor.sentences(LONG_PARAGRAPH)) == 4 < result["chunks"] == len(sources)
    assert len(result["chunk_tokens"]) == len(sources) and max(result["chunk_tokens"]) <= SMALL_LIMIT
    assert sum(result["chunk_tokens"]) > 3 * SMALL_LIMIT
    # Nothing truncated or reordered: the chunks are the paragraph, word for word.
    assert " ".join(sources).split() == LONG_PARAGRAPH.split()
    # Splits fall at clause boundaries where there are any.
    assert any(chunk.endswith(",") for chunk in sources)
    for token in ("Nike Air", "$89.99", "www.example.com"):
        assert token in result["korean"]
    assert all(entry["budget"] <= SMALL_LIMIT - 1 for entry in result["length_limited"])


def test_a_sentence_within_the_limit_is_one_chunk(small):
    out = kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy="Fresh coffee. Hot tea!"), profile="real")
    assert out.result["chunk_sources"] == ["Fresh coffee.", "Hot tea!"]


def test_a_word_over_the_limit_is_permanent_with_details(small):
    monster = "pneumonoultramicroscopicsilicovolcanoconiosislikeword" * 2  # lower case: not a brand
    copy = f"Great shoes for you. Try our {monster} today."
    with pytest.raises(PermanentStageError, match="sentence 2 has a word of") as caught:
        kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy=copy), profile="real")
    details = caught.value.details
    assert details["sentence_number"] == 2 and details["word"] == monster
    assert details["limit"] == SMALL_LIMIT and details["tokens"] > SMALL_LIMIT
    assert details["limit_from"] == "config.max_position_embeddings"
    import json

    json.dumps(details)  # recorded beside the error in PostgreSQL


def test_a_model_error_retrying_cannot_fix_is_permanent(small, monkeypatch):
    from stages.models import load_translator

    bundle = load_translator("real")

    def broken(**kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(bundle.model, "generate", broken)
    with pytest.raises(PermanentStageError, match="IndexError") as caught:
        kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy="Fresh coffee every morning"), profile="real")
    assert caught.value.details["limit"] == SMALL_LIMIT and caught.value.details["chunks"]


def test_long_sentences_are_cut_at_clauses_then_conjunctions_then_words():
    def count(text):
        return len(text.split())

    def fits(text):
        return count(text) <= 5

    sentence = "one two three, four five six seven and eight nine ten"
    assert kor.split_to_fit(sentence, fits, count) == ["one two three, ", "four five six seven ", "and eight nine ten"]
    assert kor.split_to_fit("short enough here", fits, count) == ["short enough here"]
    words = "a b c d e f g h i j k l"
    pieces = kor.split_to_fit(words, fits, count)
    assert "".join(pieces) == words and len(pieces) == 3 and all(fits(p) for p in pieces)


def test_a_sentence_of_only_protected_tokens_is_not_sent_to_the_model(small):
    out = kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy="Fresh coffee today. $4.99!"), profile="real")
    assert out.result["korean"].endswith(" $4.99!")
    assert out.result["chunk_sources"] == ["Fresh coffee today.", "$4.99!"]


def test_copy_with_nothing_to_translate_passes_through(small):
    out = kor.run(stage_input("ad_copy_gen_kor", variant=None, ad_copy="#sale #summer\n$4.99"), profile="real")
    assert out.result["korean"] == "#sale #summer\n$4.99" and out.result["chunks"] == 0
