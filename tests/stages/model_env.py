"""Offline settings and inputs for the model-stage tests. Import it before anything imports a model library.

The hub and ultralytics read their offline switches and config folder when first imported, so they
are set here, at import, for the whole test process: no test may reach the network, and ultralytics
finds its font in a temporary config folder instead of downloading one.
"""
from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="yolo-config-"))
atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
_FONTS = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"), *Path("/usr/share/fonts").glob("**/*.ttf")]
_font = next((f for f in _FONTS if f.is_file()), None)
if _font is not None:
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copyfile(_font, _CONFIG_DIR / name)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_VERBOSE": "false",
    "YOLO_CONFIG_DIR": str(_CONFIG_DIR),
}
os.environ.update(OFFLINE_ENV)

# Settings the stages read at call time; tests that need other values set them with monkeypatch.
STAGE_ENV = ("MODEL_PROFILE", "VLM_MAX_NEW_TOKENS", "VLM_GUIDED_JSON", "VLM_CACHE_IMPLEMENTATION", "YOLO_CONF",
             "YOLO_IMGSZ", "VLM_BATCH", "YOLO_BATCH", "VLM_MODEL", "YOLO_MODEL", "TRANSLATION_MODEL")

from PIL import Image  # noqa: E402  (after the environment above)

from stages.contract import StageInput  # noqa: E402


def clean_stage_env(monkeypatch) -> None:
    for name in STAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


def png(color=(200, 30, 30), size=(48, 40), image: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (image or Image.new("RGB", size, color)).save(buf, format="PNG")
    return buf.getvalue()


def stage_input(stage: str, variant: str = "v1", **kwargs: Any) -> StageInput:
    fields: dict[str, Any] = dict(
        stage=stage, job_id="job-1", tenant_id="tenant-1", variant_id=variant, attempt=1,
        ad_copy="Fresh coffee every morning", image=None, results={},
    )
    fields.update(kwargs)
    return StageInput(**fields)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- tiny random checkpoints of the real profile's default architectures, saved as the hub has them ---

# The chat template transformers' conversion script (models/llava_onevision/
# convert_llava_onevision_weights_to_hf.py) gave llava-hf/llava-onevision-qwen2-*-ov-hf.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ONEVISION_IMAGE = 32  # SigLIP input side; anyres tiles the image into crops of this size
ONEVISION_PATCH = 8


def qwen2_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) trained here on a few lines, with
    the specials of Qwen2-Instruct and LLaVA-OneVision's <image> and <video>."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    from stages.models import _TINY_CORPUS

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator([*_TINY_CORPUS, "system user assistant"], trainer)
    state = json.loads(core.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False),
                          AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    return tokenizer


def save_onevision_checkpoint(folder: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision (SigLIP vision tower without head, Qwen2 text model, anyres tiling, image
    newline parameter, tied embeddings, output layer padded to a multiple of 64 as the conversion
    does) with random weights, saved with its processor like llava-hf's checkpoints."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from stages import models

    tokenizer = qwen2_tokenizer()
    side = ONEVISION_IMAGE
    grid = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side], [side, 3 * side], [3 * side, side]]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        num_image_tokens=(side // ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(
            vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
            bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=side,
            patch_size=ONEVISION_PATCH, vision_use_head=False,
        ).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        use_image_newline_parameter=True,
        tie_word_embeddings=True,
    )
    model = models._seeded(seed, lambda: LlavaOnevisionForConditionalGeneration(config))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def save_marian_checkpoint(folder: Path) -> Path:
    """MarianMT with its SentencePiece MarianTokenizer (the opus-mt architecture), random weights."""
    from stages import models

    bundle = models._tiny_translator("cpu")
    bundle.tokenizer.save_pretrained(folder)
    bundle.model.save_pretrained(folder)
    return folder


def save_yolo11_checkpoint(path: Path, seed: int = 0) -> Path:
    """YOLO11n from ultralytics' own architecture file, random weights, saved as a .pt checkpoint
    (half precision, as ultralytics saves and publishes them)."""
    from ultralytics import YOLO

    from stages import models

    model = models._seeded(seed, lambda: YOLO("yolo11n.yaml", task="detect"))
    model.save(str(path))
    return path
