"""vlm_analyze and vlm_judge: a vision-language model answers fixed questions as JSON, in batches.

Works with any transformers image-text-to-text model whose processor has a chat template (the real
profile's LLaVA-OneVision, the tiny profile's LLaVA). A batch is one left-padded `generate` call.

Answers are JSON of a fixed schema per stage. Guided decoding (stages.guided_json on llguidance, env
VLM_GUIDED_JSON, on by default; it needs a fast tokenizer) keeps every answer a valid instance of the
schema; the answer is then parsed strictly all the same. An answer that still fails (guidance off, or a token budget set below
the schema's length by VLM_MAX_NEW_TOKENS) is regenerated once with sampling, since greedy decoding
would only repeat itself; a second failure is permanent and carries both raw texts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList

from stages import guided_json as gj
from stages.contract import PermanentStageError, StageInput, StageOutput
from stages.imaging import load_image, rgb_to_hex
from stages.models import VlmBundle, load_vlm, profile_marker, run_halving_on_oom

log = logging.getLogger(__name__)

MAX_AD_COPY_CHARS = 500
RETRY_TEMPERATURE = 0.7
PIXEL_COLOURS = 4
PIXEL_COLOURS_SOURCE = "computed from the image pixels (median-cut quantisation), not by the model"


def _analyze_schema(tiny: bool) -> gj.Object:
    # The tiny profile's random model fills every string to its limit: short limits keep it fast.
    return gj.Object((
        ("usable", gj.Bool()),
        ("reasons", gj.Array(gj.Str(12 if tiny else 80), max_items=2 if tiny else 3)),
        ("description", gj.Str(16 if tiny else 200)),
        ("main_subject", gj.Str(12 if tiny else 40)),
        ("dominant_colors", gj.Array(gj.Str(10 if tiny else 20), max_items=2 if tiny else 4)),
    ))


def _judge_schema(tiny: bool) -> gj.Object:
    score = gj.Int(1, 10)
    return gj.Object((
        ("scores", gj.Object((
            ("layout", score), ("legibility", score), ("product_visibility", score), ("overall", score),
        ))),
        ("verdict", gj.Enum(("pass", "fail"))),
        ("reasons", gj.Str(24 if tiny else 200)),
    ))


# One object per (stage, profile) for the life of the process: guides cache states by identity.
ANALYZE_SCHEMAS = {"real": _analyze_schema(False), "tiny": _analyze_schema(True)}
JUDGE_SCHEMAS = {"real": _judge_schema(False), "tiny": _judge_schema(True)}


def analyze_prompt(schema: gj.Object) -> str:
    return (
        "You are checking an AI-generated image before it is used in an Instagram ad. "
        "usable: can it be used as is (no distorted people or products, no garbled text, no visible "
        "generation artifacts)? reasons: short reasons for that decision. description: what the image "
        "shows. main_subject: the main subject. dominant_colors: the most visible colours, as names. "
        f"Answer with one JSON object and nothing else, exactly in this form: {gj.describe(schema)}"
    )


def judge_prompt(schema: gj.Object, ad_copy: str) -> str:
    copy = " ".join(ad_copy.split())[:MAX_AD_COPY_CHARS]
    return (
        "You are judging a finished Instagram ad creative: an image with the ad copy rendered on it. "
        f'The ad copy is: "{copy}". Score each criterion from 1 (bad) to 10 (excellent): layout (the '
        "text is well placed and covers neither the product nor faces), legibility (the text is easy "
        "to read), product_visibility (the product is clearly visible), overall. verdict: \"pass\" if "
        "the creative can be published as is, else \"fail\". reasons: one short sentence. "
        f"Answer with one JSON object and nothing else, exactly in this form: {gj.describe(schema)}"
    )


@dataclass(frozen=True)
class _Request:
    index: int
    image: Image.Image
    prompt: str


@dataclass(frozen=True)
class _Task:
    stage: str
    schemas: dict[str, gj.Object]
    # (input, schema) -> (image, prompt, extra result fields); raises for a bad input.
    prepare: Callable[[StageInput, gj.Object], tuple[Image.Image, str, dict[str, Any]]]


def guided_default() -> bool:
    return os.environ.get("VLM_GUIDED_JSON", "1").strip().lower() not in {"0", "false", "no", "off"}


def token_budget(schema: gj.Object) -> int:
    """Enough new tokens for the longest answer the schema allows (a token is at least a character)."""
    override = os.environ.get("VLM_MAX_NEW_TOKENS", "").strip()
    return int(override) if override else gj.max_chars(schema) + 1


def logits_width(model) -> int:
    """How many scores the model gives per step: its output layer, often padded past the tokenizer."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def guide_for(bundle: VlmBundle, schema: gj.Object) -> gj.JsonGuide:
    with bundle.guides_lock:
        tokenizer = bundle.guides.get("tokenizer")
        if tokenizer is None:
            tokenizer = bundle.guides["tokenizer"] = gj.GuideTokenizer(
                bundle.tokenizer, logits_width(bundle.model), bundle.eos_ids)
        guide = bundle.guides.get(id(schema))
        if guide is None:
            guide = bundle.guides[id(schema)] = gj.JsonGuide(tokenizer, schema, bundle.model.device)
        return guide


def warm(profile: str | None = None, device: str = "cpu") -> VlmBundle:
    bundle = load_vlm(profile, device)
    for schemas in (ANALYZE_SCHEMAS, JUDGE_SCHEMAS):
        guide_for(bundle, schemas[bundle.profile])
    return bundle


def generate_texts(
    bundle: VlmBundle, images: Sequence[Image.Image], prompts: Sequence[str], schema: gj.Object,
    guided: bool, sample: bool = False,
) -> list[str]:
    """One batched generate; returns each row's new text."""
    chats = [
        bundle.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    model = bundle.model
    encoded = bundle.processor(images=list(images), text=chats, return_tensors="pt", padding=True)
    encoded = encoded.to(model.device)
    if "pixel_values" in encoded:
        encoded["pixel_values"] = encoded["pixel_values"].to(model.dtype)
    options: dict[str, Any] = {
        "max_new_tokens": token_budget(schema),
        "pad_token_id": bundle.tokenizer.pad_token_id,
        "eos_token_id": bundle.eos_ids,
        "do_sample": sample,
    }
    if sample:
        options["temperature"] = RETRY_TEMPERATURE
    if guided:
        options["logits_processor"] = LogitsProcessorList([gj.JsonLogitsProcessor(guide_for(bundle, schema))])
    if os.environ.get("VLM_CACHE_IMPLEMENTATION"):
        options["cache_implementation"] = os.environ["VLM_CACHE_IMPLEMENTATION"]
    with torch.inference_mode():
        out = model.generate(**encoded, **options)
    new_tokens = out[:, encoded["input_ids"].shape[1]:]
    return bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _answer(
    bundle: VlmBundle, requests: list[_Request], schema: gj.Object, guided: bool, sample: bool,
    generate: Callable[..., list[str]],
) -> list[str]:
    return run_halving_on_oom(
        lambda part: generate(bundle, [r.image for r in part], [r.prompt for r in part], schema, guided, sample),
        requests,
    )


def run_task(
    task: _Task, inputs: Sequence[StageInput], profile: str | None, device: str, guided: bool | None,
    generate: Callable[..., list[str]] = generate_texts,
) -> list[StageOutput | BaseException]:
    outputs: list[StageOutput | BaseException | None] = [None] * len(inputs)
    try:
        bundle = load_vlm(profile, device)
    except Exception as exc:  # a configuration problem: every input gets it
        return [exc] * len(inputs)
    guided = guided_default() if guided is None else guided
    schema = task.schemas[bundle.profile]
    requests: list[_Request] = []
    extras: dict[int, dict[str, Any]] = {}
    for i, inp in enumerate(inputs):
        try:
            image, prompt, extra = task.prepare(inp, schema)
        except Exception as exc:
            outputs[i] = exc
            continue
        requests.append(_Request(i, image, prompt))
        extras[i] = extra

    raw: dict[int, list[str]] = {r.index: [] for r in requests}
    errors: dict[int, list[str]] = {r.index: [] for r in requests}
    pending = requests
    for attempt in (1, 2):
        if not pending:
            break
        try:
            texts = _answer(bundle, pending, schema, guided, sample=attempt > 1, generate=generate)
        except Exception as exc:  # the whole call failed (e.g. out of memory on a single input)
            for r in pending:
                outputs[r.index] = exc
            break
        failed = []
        for r, text in zip(pending, texts):
            raw[r.index].append(text)
            try:
                parsed = gj.parse_strict(text, schema)
            except gj.SchemaError as exc:
                errors[r.index].append(str(exc))
                failed.append(r)
                continue
            outputs[r.index] = StageOutput(result={
                **parsed, **extras[r.index], "raw_text": text, "attempts": attempt, "guided_json": guided,
                "model": bundle.name, **profile_marker(bundle.profile),
            })
        if failed:
            log.warning("%s: %d answer(s) did not match the schema on attempt %d", task.stage, len(failed), attempt)
        pending = failed
    for r in pending:
        if outputs[r.index] is None:
            outputs[r.index] = PermanentStageError(
                f"{task.stage}: the model's answer did not match the JSON schema in 2 attempts: {errors[r.index][-1]}",
                details={"raw_text": raw[r.index], "errors": errors[r.index], "guided_json": guided,
                         "model": bundle.name, **profile_marker(bundle.profile)},
            )
    return outputs  # type: ignore[return-value]


def pixel_colours(image: Image.Image, count: int = PIXEL_COLOURS) -> list[dict[str, Any]]:
    """The image's main colours with their share of the pixels, measured rather than asked for."""
    small = image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    quantised = small.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
    palette = quantised.getpalette() or []
    counts = np.bincount(np.asarray(quantised).ravel(), minlength=count)
    total = counts.sum()
    order = np.argsort(-counts, kind="stable")
    return [
        {"hex": rgb_to_hex(palette[3 * i: 3 * i + 3]), "share": round(float(counts[i] / total), 3)}
        for i in order
        if counts[i] > 0
    ]


def _prepare_analyze(inp: StageInput, schema: gj.Object) -> tuple[Image.Image, str, dict[str, Any]]:
    image = load_image(inp.image)
    extra = {
        "image_size": list(image.size),
        "pixel_colors": pixel_colours(image),
        "pixel_colors_source": PIXEL_COLOURS_SOURCE,
    }
    return image, analyze_prompt(schema), extra


def _prepare_judge(inp: StageInput, schema: gj.Object) -> tuple[Image.Image, str, dict[str, Any]]:
    overlay = inp.results.get("overlay") or {}
    key = (overlay.get("artifacts") or {}).get("overlay.png")
    if not key:
        raise PermanentStageError(
            "vlm_judge needs the overlay stage's overlay.png artifact, which this variant's results lack",
            details={"stages_with_results": sorted(inp.results)},
        )
    if not inp.ad_copy or not inp.ad_copy.strip():
        raise PermanentStageError("vlm_judge: the job has no ad copy to judge")
    image = load_image(inp.read_artifact(key))
    return image, judge_prompt(schema, inp.ad_copy), {"overlay_artifact": key}


ANALYZE = _Task("vlm_analyze", ANALYZE_SCHEMAS, _prepare_analyze)
JUDGE = _Task("vlm_judge", JUDGE_SCHEMAS, _prepare_judge)


def analyze_batch(
    inputs: Sequence[StageInput], profile: str | None = None, device: str = "cpu", guided: bool | None = None,
) -> list[StageOutput | BaseException]:
    return run_task(ANALYZE, inputs, profile, device, guided)


def judge_batch(
    inputs: Sequence[StageInput], profile: str | None = None, device: str = "cpu", guided: bool | None = None,
) -> list[StageOutput | BaseException]:
    return run_task(JUDGE, inputs, profile, device, guided)
