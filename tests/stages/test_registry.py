"""The stage registry: order, pools, batch limits, lazy imports, and model stages through it."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages import registry
from stages.contract import StageOutput
from tests.stages.model_env import clean_stage_env, cuda_available, png, stage_input

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_stage_env(monkeypatch)


def test_all_ten_stages_in_pipeline_order():
    specs = registry.build_registry("tiny")
    assert tuple(specs) == registry.STAGE_NAMES == (
        "vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
        "iou_eval", "ad_copy_gen_kor", "instagram_feed_gen",
    )
    assert registry.VARIANT_STAGES + registry.JOB_STAGES == registry.STAGE_NAMES
    gpu = {name for name, spec in specs.items() if spec.device == "gpu"}
    assert gpu == {"vlm_analyze", "yolo_detect", "vlm_judge"}
    assert all(spec.name == name for name, spec in specs.items())
    assert all(spec.warm is not None for name, spec in specs.items() if name in gpu)
    assert all(spec.max_batch == 1 for name, spec in specs.items() if spec.device == "cpu")


def test_batch_limits_come_from_the_environment(monkeypatch):
    specs = registry.build_registry("tiny")
    assert (specs["vlm_analyze"].max_batch, specs["vlm_judge"].max_batch, specs["yolo_detect"].max_batch) == (16, 16, 32)
    monkeypatch.setenv("VLM_BATCH", "4")
    monkeypatch.setenv("YOLO_BATCH", "64")
    specs = registry.build_registry("tiny")
    assert (specs["vlm_analyze"].max_batch, specs["vlm_judge"].max_batch, specs["yolo_detect"].max_batch) == (4, 4, 64)
    monkeypatch.setenv("YOLO_BATCH", "0")
    with pytest.raises(ValueError, match="YOLO_BATCH"):
        registry.build_registry("tiny")


def test_profile_and_device_are_checked(monkeypatch):
    monkeypatch.setenv("MODEL_PROFILE", "tiny")
    assert "RANDOM-WEIGHT" in registry.describe_profile(None)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        registry.build_registry("tiny", device="gpu")
    with pytest.raises(ValueError, match="MODEL_PROFILE"):
        registry.build_registry("small")


@pytest.mark.skipif(cuda_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_registry_without_cuda_fails_clearly_at_warm():
    from stages.models import DeviceUnavailableError

    specs = registry.build_registry("tiny", device="cuda")
    with pytest.raises(DeviceUnavailableError, match="--device cpu"):
        specs["yolo_detect"].warm()
    outputs = specs["vlm_analyze"].run_batch([stage_input("vlm_analyze", image=png())])
    assert isinstance(outputs[0], DeviceUnavailableError)


def test_importing_the_registry_imports_no_model_library():
    code = (
        "import sys, stages.registry as r; r.build_registry('tiny'); r.describe_profile('real'); "
        "heavy = [m for m in ('torch', 'transformers', 'ultralytics') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_model_stages_run_through_the_registry(monkeypatch):
    monkeypatch.setenv("YOLO_CONF", "0.000001")
    specs = registry.build_registry("tiny")
    specs["yolo_detect"].warm()
    out = specs["yolo_detect"].run_batch([stage_input("yolo_detect", image=png(size=(64, 48)))])[0]
    assert isinstance(out, StageOutput) and out.result["profile"] == "tiny" and out.result["image_size"] == [64, 48]
    out = specs["ad_copy_gen_kor"].run_batch([stage_input("ad_copy_gen_kor", variant=None, ad_copy="Buy NIKE now")])[0]
    assert isinstance(out, StageOutput) and "NIKE" in out.result["korean"] and out.result["profile"] == "tiny"


def test_a_missing_stage_module_fails_its_own_tasks():
    run_batch = registry._per_input("no_such_stage_module")
    outputs = run_batch([stage_input("planner"), stage_input("planner", variant="v2")])
    assert len(outputs) == 2 and all(isinstance(o, ModuleNotFoundError) for o in outputs)
