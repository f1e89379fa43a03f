"""The real profile's loading path on its default architectures: LLaVA-OneVision (SigLIP + Qwen2,
its processor and chat template), Marian and YOLO11, as tiny random checkpoints saved the way the
hub and ultralytics publish them, loaded through MODEL_PROFILE=real from local paths.

The weights are random, so the answers mean nothing; what is checked is that the path a production
worker takes (classes, processor, template, guided decoding at a padded vocabulary, batching with
anyres tiles) works on these architectures, and that it loads exactly the saved weights.
"""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import pytest
import torch

from stages import ad_copy_gen_kor, models, vlm, yolo_detect
from stages import guided_json as gj
from stages.contract import StageOutput
from stages.registry import build_registry
from tests.stages.model_env import (
    clean_stage_env,
    png,
    save_marian_checkpoint,
    save_onevision_checkpoint,
    save_yolo11_checkpoint,
    stage_input,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "VLM_MODEL": save_onevision_checkpoint(root / "llava-onevision-qwen2-tiny-ov-hf"),
        "TRANSLATION_MODEL": save_marian_checkpoint(root / "opus-mt-tiny-en-ko"),
        "YOLO_MODEL": save_yolo11_checkpoint(root / "yolo11n-random.pt"),
    }


@pytest.fixture(autouse=True)
def _env(monkeypatch, checkpoints):
    clean_stage_env(monkeypatch)
    monkeypatch.setenv("MODEL_PROFILE", "real")
    for name, path in checkpoints.items():
        monkeypatch.setenv(name, str(path))


def assert_real(result, checkpoints, variable):
    assert result["profile"] == "real" and "warning" not in result
    assert result["model"] == str(checkpoints[variable])


def test_the_vlm_is_llava_onevision_with_the_saved_weights(checkpoints):
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    bundle = models.load_vlm()
    config = bundle.model.config
    assert type(bundle.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert (config.vision_config.model_type, config.text_config.model_type) == ("siglip_vision_model", "qwen2")
    assert type(bundle.processor).__name__ == "LlavaOnevisionProcessor"
    assert type(bundle.tokenizer).__name__ == "Qwen2Tokenizer" and bundle.tokenizer.padding_side == "left"
    assert bundle.profile == "real" and bundle.name == str(checkpoints["VLM_MODEL"])
    assert bundle.eos_ids == sorted(bundle.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    # The same architecture built again from the same seed: the weights the checkpoint holds.
    reference = models._seeded(0, lambda: LlavaOnevisionForConditionalGeneration(
        AutoConfig.from_pretrained(checkpoints["VLM_MODEL"])))
    state = bundle.model.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(state[name], tensor), name
    chat = bundle.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        add_generation_prompt=True)
    assert chat == "<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2's output layer is wider than its tokenizer; the guide must cover the whole width.
    assert vlm.logits_width(bundle.model) % 64 == 0 and vlm.logits_width(bundle.model) > len(bundle.tokenizer)


def analyze_inputs():
    # Different aspect ratios: anyres tiles them differently, so rows get different image-token counts.
    sizes = ((40, 36), (120, 40), (40, 120))
    colours = ((220, 20, 20), (20, 200, 20), (20, 20, 220))
    return [stage_input("vlm_analyze", variant=f"v{i}", image=png(c, size=s)) for i, (c, s) in enumerate(zip(colours, sizes))]


def test_analyze_answers_through_the_real_path_match_the_schema(checkpoints):
    inputs = analyze_inputs()
    batched = vlm.analyze_batch(inputs)
    for out in batched:
        assert isinstance(out, StageOutput), out
        assert_real(out.result, checkpoints, "VLM_MODEL")
        assert out.result["guided_json"] is True and out.result["attempts"] == 1
        gj.parse_strict(out.result["raw_text"], vlm.ANALYZE_SCHEMAS["real"])
    single = [vlm.analyze_batch([inp])[0] for inp in inputs]
    assert [o.result["raw_text"] for o in batched] == [o.result["raw_text"] for o in single]


def test_judge_through_the_real_path(checkpoints):
    store = {"art/1": png((250, 250, 250), size=(64, 80))}
    inp = stage_input("vlm_judge", ad_copy="Fresh coffee every morning", read_artifact=store.__getitem__,
                      results={"overlay": {"artifacts": {"overlay.png": "art/1"}}})
    out, = vlm.judge_batch([inp])
    assert isinstance(out, StageOutput), out
    assert_real(out.result, checkpoints, "VLM_MODEL")
    assert all(1 <= v <= 10 for v in out.result["scores"].values()) and out.result["verdict"] in ("pass", "fail")


def test_translation_is_marian_with_the_saved_weights(checkpoints):
    bundle = models.load_translator()
    assert type(bundle.model).__name__ == "MarianMTModel" and type(bundle.tokenizer).__name__ == "MarianTokenizer"
    reference = models._tiny_translator("cpu")
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[name], tensor), name
    out = ad_copy_gen_kor.run(stage_input("ad_copy_gen_kor", ad_copy="Fresh coffee for only $4.99 at www.example.com"))
    assert_real(out.result, checkpoints, "TRANSLATION_MODEL")
    assert all(v in out.result["korean"] for v in out.result["protected"])


def test_yolo_is_yolo11_with_the_saved_weights(checkpoints):
    bundle = models.load_yolo()
    assert type(bundle.model.model).__name__ == "DetectionModel"
    assert bundle.model.model.yaml["yaml_file"] == "yolo11n.yaml" and bundle.imgsz == 640
    reference = models._seeded(0, lambda: __import__("ultralytics").YOLO("yolo11n.yaml", task="detect"))
    loaded = bundle.model.model.state_dict()
    for name, tensor in reference.model.state_dict().items():
        if tensor.is_floating_point():  # saved in half precision, as ultralytics publishes weights
            assert torch.equal(loaded[name], tensor.half().to(tensor.dtype)), name
    out, = yolo_detect.detect_batch([stage_input("yolo_detect", image=png((120, 120, 120), size=(80, 60)))])
    assert isinstance(out, StageOutput), out
    assert_real(out.result, checkpoints, "YOLO_MODEL")
    assert out.result["image_size"] == [80, 60]


def test_a_worker_warms_every_model_stage_on_the_real_path(checkpoints):
    stages = build_registry(profile="real", device="cpu")
    warmed = [name for name, stage in stages.items() if stage.warm]
    assert {"vlm_analyze", "vlm_judge", "yolo_detect", "ad_copy_gen_kor"} <= set(warmed)
    for name in warmed:
        stages[name].warm()
    # Keys are (kind, profile, device, name); other tests put keys of their own in the cache.
    loaded = {(key[0], key[3]) for key in models.loaded_models() if len(key) == 4 and key[1] == "real"}
    assert {(k, str(checkpoints[v])) for k, v in (("vlm", "VLM_MODEL"), ("yolo", "YOLO_MODEL"),
                                                  ("translation", "TRANSLATION_MODEL"))} <= loaded
