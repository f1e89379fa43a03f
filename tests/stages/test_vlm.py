"""vlm_analyze and vlm_judge on the tiny random-weight LLaVA: schema-valid answers, retries, batching."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import json

import pytest
import torch
from PIL import Image

from stages import guided_json as gj
from stages import vlm
from stages.contract import PermanentStageError, StageOutput
from tests.stages.model_env import clean_stage_env, cuda_available, png, stage_input

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_stage_env(monkeypatch)


def analyze_inputs(colours=((220, 20, 20), (20, 200, 20), (20, 20, 220))):
    return [stage_input("vlm_analyze", variant=f"v{i}", image=png(c, size=(40 + 8 * i, 36))) for i, c in enumerate(colours)]


def judge_inputs(copies=("Buy now", "Fresh coffee every morning for only $4.99 at www.example.com #coffee")):
    store = {"art/1": png((250, 250, 250), size=(64, 64)), "art/2": png((10, 10, 10), size=(48, 64))}
    return [
        stage_input("vlm_judge", variant=f"v{i}", ad_copy=copy, read_artifact=store.__getitem__,
                    results={"overlay": {"artifacts": {"overlay.png": f"art/{i + 1}"}}})
        for i, copy in enumerate(copies)
    ]


def assert_tiny(result):
    assert result["profile"] == "tiny" and "not meaningful" in result["warning"]
    assert result["model"].startswith("tiny-llava")


def test_analyze_answers_match_the_schema_and_are_marked_tiny():
    outputs = vlm.analyze_batch(analyze_inputs(), profile="tiny")
    for out, colour in zip(outputs, ("#dc1414", "#14c814", "#1414dc")):
        assert isinstance(out, StageOutput), out
        result = out.result
        assert_tiny(result)
        parsed = gj.parse_strict(result["raw_text"], vlm.ANALYZE_SCHEMAS["tiny"])
        assert {k: result[k] for k in parsed} == parsed
        assert result["attempts"] == 1 and result["guided_json"] is True
        assert result["pixel_colors"] == [{"hex": colour, "share": 1.0}]
        assert "not by the model" in result["pixel_colors_source"]
        json.dumps(result)  # the engine stores it as JSON
    assert [o.result["image_size"] for o in outputs] == [[40, 36], [48, 36], [56, 36]]


def test_pixel_colours_are_measured():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 255), (0, 0, 64, 16))
    colours = vlm.pixel_colours(image)
    assert [c["hex"] for c in colours] == ["#ffffff", "#0000ff"]
    assert colours[0]["share"] == pytest.approx(0.75, abs=0.02) and colours[1]["share"] == pytest.approx(0.25, abs=0.02)


def test_judge_scores_the_rubric():
    for out in vlm.judge_batch(judge_inputs(), profile="tiny"):
        assert isinstance(out, StageOutput), out
        result = out.result
        assert_tiny(result)
        assert set(result["scores"]) == {"layout", "legibility", "product_visibility", "overall"}
        assert all(isinstance(v, int) and 1 <= v <= 10 for v in result["scores"].values())
        assert result["verdict"] in ("pass", "fail") and isinstance(result["reasons"], str)
        assert result["overlay_artifact"].startswith("art/")


def test_prompts_carry_the_schema_and_the_ad_copy():
    schema = vlm.JUDGE_SCHEMAS["real"]
    prompt = vlm.judge_prompt(schema, "Fresh   coffee\nnow")
    assert '"Fresh coffee now"' in prompt and gj.describe(schema) in prompt
    assert gj.describe(vlm.ANALYZE_SCHEMAS["real"]) in vlm.analyze_prompt(vlm.ANALYZE_SCHEMAS["real"])


def test_batched_answers_equal_one_by_one():
    # Different ad copy lengths make the batch left-padded; greedy decoding must not notice.
    inputs = judge_inputs()
    batched = vlm.judge_batch(inputs, profile="tiny")
    single = [vlm.judge_batch([inp], profile="tiny")[0] for inp in inputs]
    assert [o.result["raw_text"] for o in batched] == [o.result["raw_text"] for o in single]
    inputs = analyze_inputs()
    batched = vlm.analyze_batch(inputs, profile="tiny")
    single = [vlm.analyze_batch([inp], profile="tiny")[0] for inp in inputs]
    assert [o.result["raw_text"] for o in batched] == [o.result["raw_text"] for o in single]


def test_unguided_garbage_is_retried_once_then_permanent(monkeypatch):
    monkeypatch.setenv("VLM_MAX_NEW_TOKENS", "12")
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("sample", args[5] if len(args) > 5 else False))
        return vlm.generate_texts(*args, **kwargs)

    outputs = vlm.run_task(vlm.ANALYZE, analyze_inputs()[:1], "tiny", "cpu", guided=False, generate=counting)
    error = outputs[0]
    assert isinstance(error, PermanentStageError) and "2 attempts" in str(error)
    assert calls == [False, True]  # greedy, then a sampled retry
    assert len(error.details["raw_text"]) == 2 and all(isinstance(t, str) for t in error.details["raw_text"])
    assert error.details["guided_json"] is False and error.details["profile"] == "tiny"


def test_switch_turns_guidance_off(monkeypatch):
    monkeypatch.setenv("VLM_GUIDED_JSON", "off")
    monkeypatch.setenv("VLM_MAX_NEW_TOKENS", "8")
    out = vlm.analyze_batch(analyze_inputs()[:1], profile="tiny")[0]
    assert isinstance(out, PermanentStageError) and out.details["guided_json"] is False


def test_a_second_attempt_that_parses_is_used():
    calls = []

    def first_answer_broken(bundle, images, prompts, schema, guided, sample=False):
        calls.append(len(images))
        texts = vlm.generate_texts(bundle, images, prompts, schema, guided, sample)
        return ["Sure! " + texts[0], *texts[1:]] if len(calls) == 1 else texts

    outputs = vlm.run_task(vlm.JUDGE, judge_inputs(), "tiny", "cpu", guided=True, generate=first_answer_broken)
    assert calls == [2, 1]  # only the broken answer is asked again
    assert [o.result["attempts"] for o in outputs] == [2, 1]


def test_bad_inputs_fail_alone():
    good, = judge_inputs(("Buy now",))
    no_overlay = stage_input("vlm_judge", variant="v9", results={"planner": {}})
    not_an_image = stage_input("vlm_analyze", image=b"not an image")
    outputs = vlm.judge_batch([no_overlay, good], profile="tiny")
    assert isinstance(outputs[0], PermanentStageError) and "overlay.png" in str(outputs[0])
    assert isinstance(outputs[1], StageOutput)
    assert isinstance(vlm.analyze_batch([not_an_image], profile="tiny")[0], PermanentStageError)


def test_out_of_memory_halves_the_batch():
    sizes = []

    def tight_memory(bundle, images, prompts, schema, guided, sample=False):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return vlm.generate_texts(bundle, images, prompts, schema, guided, sample)

    inputs = analyze_inputs(((250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)))
    halved = vlm.run_task(vlm.ANALYZE, inputs, "tiny", "cpu", guided=True, generate=tight_memory)
    whole = vlm.analyze_batch(inputs, profile="tiny")
    assert sizes == [5, 2, 3, 1, 2]
    assert [o.result["raw_text"] for o in halved] == [o.result["raw_text"] for o in whole]


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_tiny_vlm_on_cuda():
    outputs = vlm.analyze_batch(analyze_inputs(), profile="tiny", device="cuda")
    assert all(isinstance(o, StageOutput) and o.result["profile"] == "tiny" for o in outputs)
