"""The JSON schema automaton, the token masks built from it, and strict parsing."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import json

import pytest
import torch

from stages import guided_json as gj

SCHEMA = gj.Object((
    ("ok", gj.Bool()),
    ("tags", gj.Array(gj.Str(4), max_items=2)),
    ("n", gj.Int(1, 10)),
    ("v", gj.Enum(("pass", "fail"))),
))
VALID = '{"ok":true,"tags":["ab","cdef"],"n":10,"v":"pass"}'


@pytest.mark.parametrize("prefix", ["", "{", '{"ok":t', '{"ok":false,"tags":[', '{"ok":true,"tags":["ab",',
                                    '{"ok":true,"tags":[],"n":1', '{"ok":true,"tags":[],"n":1,"v":"fa', VALID])
def test_valid_prefixes_are_accepted(prefix):
    assert gj.is_valid_prefix(prefix, SCHEMA)


@pytest.mark.parametrize("text", [
    " {", '{"ok" :', '{"ok":1', '{"ok":true,"n"', '{"ok":true,"tags":["abcde',  # too long
    '{"ok":true,"tags":["a","b","c"', '{"ok":true,"tags":[],"n":0', '{"ok":true,"tags":[],"n":11',
    '{"ok":true,"tags":[],"n":01', '{"ok":true,"tags":[],"n":5,"v":"maybe"', '{"ok":true,"tags":["a\\n',
    VALID + " ",
])
def test_invalid_prefixes_are_refused(text):
    assert not gj.is_valid_prefix(text, SCHEMA)


def test_only_a_complete_object_ends():
    assert gj.feed(gj.initial_state(SCHEMA), VALID) == ()
    assert gj.feed(gj.initial_state(SCHEMA), VALID[:-1]) not in (None, ())


def test_max_chars_is_the_longest_answer():
    longest = '{"ok":false,"tags":["abcd","abcd"],"n":10,"v":"pass"}'
    assert gj.is_valid_prefix(longest, SCHEMA) and gj.feed(gj.initial_state(SCHEMA), longest) == ()
    assert gj.max_chars(SCHEMA) == len(longest)


def test_describe_lists_every_field():
    text = gj.describe(SCHEMA)
    assert all(f'"{key}"' in text for key in ("ok", "tags", "n", "v")) and "1-10" in text


def test_parse_strict_accepts_only_the_schema():
    assert gj.parse_strict("  " + VALID + "\n", SCHEMA)["n"] == 10
    assert gj.parse_strict(json.dumps(json.loads(VALID), indent=2), SCHEMA)["v"] == "pass"
    bad = {
        "```json\n" + VALID + "\n```": "not valid JSON",
        VALID + " trailing words": "not valid JSON",
        VALID.replace('"n":10', '"n":true'): "expected an integer",
        VALID.replace('"n":10', '"n":10.0'): "expected an integer",
        VALID.replace('"n":10', '"n":11'): "outside",
        VALID.replace('"ok":true', '"ok":"yes"'): "expected true or false",
        VALID.replace('"v":"pass"', '"v":"PASS"'): "expected one of",
        VALID.replace(',"v":"pass"', ""): "keys",
        VALID.replace("}", ',"extra":1}'): "keys",
        VALID.replace('"cdef"', '"cdefg"'): "string length",
        "[1, 2]": "expected an object",
    }
    for text, reason in bad.items():
        with pytest.raises(gj.SchemaError, match=reason):
            gj.parse_strict(text, SCHEMA)


def test_schemas_that_need_lookahead_are_refused():
    with pytest.raises(ValueError):
        gj.initial_state(gj.Object((('bad"key', gj.Bool()),)))
    with pytest.raises(ValueError):
        gj.initial_state(gj.Int(-1, 5))


# A hand-made vocabulary with multi-character tokens that cross JSON boundaries, as BPE ones do.
VOCAB = ['{"', "ok", '":', "true", "false", ",", '"', "tags", "[", "]", "ab", "cdef", '","', '"],"', "n", "1", "0",
         "10", '"v', "pass", "fail", '"}', "}", "x y", "</s>", '"ab', "abcde", ':"p']
EOS = VOCAB.index("</s>")


def _allowed(guide: gj.JsonGuide, state) -> set[str]:
    allowed = torch.zeros(1, len(VOCAB) + 3, dtype=torch.bool)  # a model may have unused extra ids
    guide.fill([state], allowed)
    assert not allowed[0, len(VOCAB):].any()
    return {VOCAB[i] for i in allowed[0].nonzero().flatten().tolist()}


def test_guide_masks_follow_the_schema():
    texts = [t if t != "</s>" else None for t in VOCAB]
    guide = gj.JsonGuide(texts, SCHEMA, [EOS])
    start = gj.initial_state(SCHEMA)
    assert _allowed(guide, start) == {'{"'}
    after_key = gj.feed(start, '{"ok')
    assert _allowed(guide, after_key) == {'":', '"'}
    in_tags = gj.feed(start, '{"ok":true,"tags":[')
    # Any token that opens a string is fine here, whatever the string then holds.
    assert _allowed(guide, in_tags) == {'"', "]", '"ab', '","', '"],"', '"}', '"v', '":'}
    in_string = gj.feed(in_tags, '"ab')
    # Two characters left: short tokens without quotes, and tokens whose quote closes the string
    # in a way the rest of the schema accepts ('{"' is the text "{" and then the closing quote).
    assert _allowed(guide, in_string) == {
        "ok", ",", "[", "]", "ab", "n", "1", "0", "10", "}", '"', '","', '"],"', '{"'}
    full_string = gj.feed(in_tags, '"cdef')
    assert _allowed(guide, full_string) == {'"', '","', '"],"'}
    number = gj.feed(start, '{"ok":true,"tags":[],"n":1')
    assert _allowed(guide, number) == {"0", ","}
    assert _allowed(guide, gj.feed(start, VALID)) == {"</s>"}
    assert _allowed(guide, None) == {"</s>"}


def test_processor_tracks_rows_and_masks_each():
    texts = [t if t != "</s>" else None for t in VOCAB]
    guide = gj.JsonGuide(texts, SCHEMA, [EOS])
    processor = gj.JsonLogitsProcessor(guide)
    prompt = torch.tensor([[EOS, EOS], [EOS, EOS]])
    scores = processor(prompt, torch.zeros(2, len(VOCAB)))
    assert torch.isinf(scores).sum() == 2 * (len(VOCAB) - 1)  # only '{"' is open at the start
    step = torch.tensor([[VOCAB.index('{"')], [VOCAB.index('{"')]])
    scores = processor(torch.cat([prompt, step], 1), torch.zeros(2, len(VOCAB)))
    assert {VOCAB[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()} == {"ok"}
    # A token the mask did not allow breaks that row only; it can then only end.
    broken = torch.tensor([[VOCAB.index("ok")], [VOCAB.index("pass")]])
    scores = processor(torch.cat([prompt, step, broken], 1), torch.zeros(2, len(VOCAB)))
    assert {VOCAB[i] for i in torch.isfinite(scores[1]).nonzero().flatten().tolist()} == {"</s>"}
    assert {VOCAB[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()} == {'":', '"'}


def test_token_texts_keep_leading_spaces_and_drop_specials():
    from stages.models import tiny_vlm_tokenizer

    tokenizer = tiny_vlm_tokenizer()
    texts = gj.token_texts(tokenizer)
    assert texts[tokenizer.eos_token_id] is None and texts[tokenizer.convert_tokens_to_ids("<image>")] is None
    spaced = tokenizer.convert_tokens_to_ids("Ġt")
    assert texts[spaced] == " t"
    ids = tokenizer.encode('{"usable": true}', add_special_tokens=False)
    assert "".join(texts[i] for i in ids) == '{"usable": true}'
