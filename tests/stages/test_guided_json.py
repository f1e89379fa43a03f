"""The schema, what llguidance lets a model write under it, the token masks, and strict parsing."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import json

import jsonschema
import pytest
import torch

from stages import guided_json as gj
from stages.models import tiny_vlm_tokenizer

SCHEMA = gj.Object((
    ("ok", gj.Bool()),
    ("tags", gj.Array(gj.Str(4), max_items=2)),
    ("n", gj.Int(1, 10)),
    ("v", gj.Enum(("pass", "fail"))),
))
VALID = '{"ok":true,"tags":["ab","cdef"],"n":10,"v":"pass"}'
PADDING = 3  # models pad their output layer past the tokenizer: those ids must never be allowed


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_vlm_tokenizer()


@pytest.fixture(scope="module")
def guide(tokenizer):
    return gj.JsonGuide(gj.GuideTokenizer(tokenizer, len(tokenizer) + PADDING, [tokenizer.eos_token_id]), SCHEMA)


@pytest.mark.parametrize("prefix", ["", "{", '{"ok":t', '{"ok":false,"tags":[', '{"ok":true,"tags":["ab",',
                                    '{"ok":true,"tags":[],"n":1', '{"ok":true,"tags":[],"n":1,"v":"fa', VALID])
def test_valid_prefixes_are_accepted(guide, prefix):
    assert guide.accepts(prefix)


@pytest.mark.parametrize("text", [
    " {", '{"ok" :', '{"ok":1', '{"ok":true,"n"', '{"ok":true,"tags":["abcde',  # too long
    '{"ok":true,"tags":["a","b","c"', '{"ok":true,"tags":[],"n":0', '{"ok":true,"tags":[],"n":11',
    '{"ok":true,"tags":[],"n":01', '{"ok":true,"tags":[],"n":5,"v":"maybe"', '{"ok":true,"tags":["a\\n',
    '{"ok":true,"tags":["a\\"', VALID + " ",
])
def test_invalid_prefixes_are_refused(guide, text):
    assert not guide.accepts(text)


def test_only_a_complete_object_ends(guide):
    assert guide.accepts(VALID, complete=True)
    assert guide.accepts(VALID[:-1]) and not guide.accepts(VALID[:-1], complete=True)


def test_max_chars_is_the_longest_answer(guide):
    longest = '{"ok":false,"tags":["abcd","abcd"],"n":10,"v":"pass"}'
    assert guide.accepts(longest, complete=True)
    assert gj.max_chars(SCHEMA) == len(longest)
    assert gj.max_chars(gj.Int(-100, 7)) == 4


def test_describe_lists_every_field():
    text = gj.describe(SCHEMA)
    assert all(f'"{key}"' in text for key in ("ok", "tags", "n", "v")) and "1-10" in text


BAD = {
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


def test_parse_strict_accepts_only_the_schema():
    assert gj.parse_strict("  " + VALID + "\n", SCHEMA)["n"] == 10
    assert gj.parse_strict(json.dumps(json.loads(VALID), indent=2), SCHEMA)["v"] == "pass"
    for text, reason in BAD.items():
        with pytest.raises(gj.SchemaError, match=reason):
            gj.parse_strict(text, SCHEMA)


def test_the_json_schema_given_to_the_library_says_what_parse_strict_checks():
    schema = gj.json_schema(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(VALID), schema)
    for text in BAD:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if text == VALID.replace('"n":10', '"n":10.0'):
            continue  # JSON Schema counts 10.0 as an integer; the parse refuses it, and guidance never writes it
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)


def test_schemas_guidance_cannot_write_are_refused(guide):
    with pytest.raises(ValueError):
        gj.JsonGuide(guide.tokenizer, gj.Object((('bad"key', gj.Bool()),)))
    with pytest.raises(ValueError):
        gj.JsonGuide(guide.tokenizer, gj.Int(5, 1))
    with pytest.raises(ValueError):
        gj.JsonGuide(guide.tokenizer, gj.Enum(("a", "a")))


def _allowed(tokenizer, scores_row: torch.Tensor) -> set[str]:
    assert not torch.isfinite(scores_row[len(tokenizer):]).any()
    return {tokenizer.convert_ids_to_tokens(i) for i in torch.isfinite(scores_row).nonzero().flatten().tolist()}


def _step(processor, ids: torch.Tensor, width: int) -> torch.Tensor:
    return processor(ids, torch.zeros(ids.shape[0], width))


def test_processor_follows_each_row(guide, tokenizer):
    width = len(tokenizer) + PADDING
    processor = gj.JsonLogitsProcessor(guide)
    prompt = torch.full((2, 3), tokenizer.bos_token_id)
    first = _step(processor, prompt, width)
    # Only tokens that are a prefix of '{"ok":' (or all of it and more) may open the answer.
    opening = _allowed(tokenizer, first[0])
    assert opening and all(tokenizer.convert_tokens_to_string([t]).startswith("{") for t in opening)
    assert _allowed(tokenizer, first[1]) == opening
    ids = prompt
    for token in tokenizer.encode('{"ok":true,"tags":["', add_special_tokens=False):
        ids = torch.cat([ids, torch.tensor([[token], [token]])], 1)
        scores = _step(processor, ids, width)
    in_string = _allowed(tokenizer, scores[0])
    texts = {t: tokenizer.convert_tokens_to_string([t]) for t in in_string}
    assert texts and all('\\' not in text for text in texts.values())
    assert all(len(text) <= 4 or '"' in text for text in texts.values())  # Str(4): the rest must close it


def test_a_broken_or_finished_row_may_only_end(guide, tokenizer):
    width = len(tokenizer) + PADDING
    processor = gj.JsonLogitsProcessor(guide)
    ids = torch.full((2, 1), tokenizer.bos_token_id)
    _step(processor, ids, width)
    wrong = tokenizer.encode("x", add_special_tokens=False)[0]
    ids = torch.cat([ids, torch.tensor([[wrong], [tokenizer.encode("{", add_special_tokens=False)[0]]])], 1)
    scores = _step(processor, ids, width)
    assert _allowed(tokenizer, scores[0]) == {tokenizer.eos_token}
    assert tokenizer.eos_token not in _allowed(tokenizer, scores[1])

    done = gj.JsonLogitsProcessor(guide)
    ids = torch.full((1, 1), tokenizer.bos_token_id)
    _step(done, ids, width)
    for token in tokenizer.encode(VALID, add_special_tokens=False):
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        scores = _step(done, ids, width)
    assert _allowed(tokenizer, scores[0]) == {tokenizer.eos_token}
    # After the end generate pads the row; the padding is not fed to the matcher.
    ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id], [tokenizer.pad_token_id]]).T], 1)
    assert _allowed(tokenizer, _step(done, ids, width)[0]) == {tokenizer.eos_token}


def test_byte_fragments_and_specials_are_never_allowed(guide, tokenizer):
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert fragments  # a byte-level vocabulary holds the pieces of multi-byte characters
    processor = gj.JsonLogitsProcessor(guide)
    ids = torch.full((1, 1), tokenizer.bos_token_id)
    _step(processor, ids, len(tokenizer) + PADDING)
    for token in tokenizer.encode('{"ok":true,"tags":["', add_special_tokens=False):
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        scores = _step(processor, ids, len(tokenizer) + PADDING)
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert len(allowed) > 50  # inside a string most of the vocabulary fits
    assert not set(allowed) & set(fragments)
    assert not set(allowed) & (set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


def test_a_width_other_than_the_guides_is_refused(guide, tokenizer):
    with pytest.raises(ValueError, match="logits"):
        _step(gj.JsonLogitsProcessor(guide), torch.zeros((1, 1), dtype=torch.long), len(tokenizer))


def test_the_gpu_unpacking_reads_the_masks_as_the_cpu_one_does(guide):
    """Both ways from packed masks to refused tokens agree (the tensor one runs on a GPU)."""
    words = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32)
    words[0] = -1  # all allowed, sign bit included
    words[1] = 0
    vocab = 5 * 32 - 7
    on_cpu = guide.refused(words, vocab)
    assert on_cpu.shape == (3, vocab) and not on_cpu[0].any() and on_cpu[1].all()
    assert torch.equal(gj.unpack_refused(words, vocab, torch.arange(32, dtype=torch.int32)), on_cpu)
    expected = [[not (int(w) >> b) & 1 for w in row for b in range(32)][:vocab] for row in words.tolist()]
    assert on_cpu.tolist() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_on_cuda_equal_those_on_the_cpu(guide, tokenizer):
    on_gpu = gj.JsonGuide(guide.tokenizer, SCHEMA, "cuda")
    ids = torch.full((2, 1), tokenizer.bos_token_id)
    cpu, gpu = gj.JsonLogitsProcessor(guide), gj.JsonLogitsProcessor(on_gpu)
    width = len(tokenizer) + PADDING
    for token in [None, *tokenizer.encode('{"ok":true,"tags":["ab', add_special_tokens=False)]:
        if token is not None:
            ids = torch.cat([ids, torch.tensor([[token], [token]])], 1)
        expected = cpu(ids, torch.zeros(2, width))
        assert torch.equal(gpu(ids.cuda(), torch.zeros(2, width, device="cuda")).cpu(), expected)
