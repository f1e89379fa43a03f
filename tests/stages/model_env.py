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
