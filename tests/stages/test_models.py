"""Profiles, devices, loading (real weights fail fast offline; tiny ones are built here), OOM halving."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.stages import model_env  # noqa: F401  (offline environment first)

import pytest
import torch

from stages import models
from tests.stages.model_env import clean_stage_env, cuda_available, save_onevision_checkpoint

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_stage_env(monkeypatch)


def test_profile_comes_from_argument_then_env_then_real(monkeypatch):
    assert models.resolve_profile() == "real"
    monkeypatch.setenv("MODEL_PROFILE", "TINY")
    assert models.resolve_profile() == "tiny"
    assert models.resolve_profile("real") == "real"
    monkeypatch.setenv("MODEL_PROFILE", "huge")
    with pytest.raises(ValueError, match="MODEL_PROFILE"):
        models.resolve_profile()


def test_tiny_marker_says_outputs_mean_nothing():
    assert models.profile_marker("tiny") == {"profile": "tiny", "warning": models.TINY_WARNING}
    assert "not meaningful" in models.TINY_WARNING
    assert models.profile_marker("real") == {"profile": "real"}


def test_describe_profile_is_plain_about_random_weights(monkeypatch):
    assert "RANDOM-WEIGHT" in models.describe_profile("tiny")
    line = models.describe_profile("real")
    assert "RANDOM" not in line and models.DEFAULT_VLM_MODEL in line and models.DEFAULT_YOLO_MODEL in line
    monkeypatch.setenv("VLM_MODEL", "/models/my-vlm")
    assert "/models/my-vlm" in models.describe_profile("real")


def test_device_names_are_checked():
    assert models.resolve_device("CPU") == "cpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        models.resolve_device("gpu")


@pytest.mark.skipif(cuda_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_without_cuda_fails_clearly():
    with pytest.raises(models.DeviceUnavailableError, match="--device cpu"):
        models.resolve_device("cuda")
    with pytest.raises(models.DeviceUnavailableError, match="no CUDA device"):
        models.load_vlm("tiny", "cuda")


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_loading(monkeypatch):
    """Model loading that fails the test: a missing model must be refused before any download
    client (and its retries) is started."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    for name in ("AutoProcessor", "AutoModelForImageTextToText", "AutoTokenizer", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def test_real_vlm_missing_from_offline_cache_names_the_variable(monkeypatch, no_loading):
    monkeypatch.setenv("VLM_MODEL", "no-such-org/no-such-vlm")
    with pytest.raises(models.ModelUnavailableError) as caught:
        models.load_vlm("real")
    message = str(caught.value)
    assert "VLM_MODEL" in message and "no-such-org/no-such-vlm" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("variable, load", [("VLM_MODEL", models.load_vlm), ("TRANSLATION_MODEL", models.load_translator)])
def test_an_unreachable_hub_fails_at_once_naming_the_variable(monkeypatch, no_loading, variable, load):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name)
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets when the hub is imported
    monkeypatch.setenv(variable, "no-such-org/no-such-model")
    with pytest.raises(models.ModelUnavailableError) as caught:
        load("real")
    message = str(caught.value)
    assert f"{variable}='no-such-org/no-such-model'" in message and endpoint in message and "unreachable" in message


def test_the_hub_probe_connects_where_the_download_would(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        listening = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert models.reachable(listening, timeout=2)
        assert not models.reachable(f"http://127.0.0.1:{closed_port()}", timeout=2)
        # Behind a proxy the connection goes to the proxy, so that is what must answer.
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert not models.reachable("http://hub.example.test", timeout=2)
        monkeypatch.setenv("HTTP_PROXY", listening)
        assert models.reachable("http://hub.example.test", timeout=2)


def cli_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODEL_PROFILE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
               DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", ADFLOW_HOME=str(tmp_path / "home"), **extra)
    return env


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "offline"])
def test_workers_start_refuses_missing_weights_at_once(tmp_path, offline):
    """As an operator sees it: the worker exits at start with the variable and the id it tried,
    without the download client's retries (which took over two minutes with the hub unreachable)."""
    env = cli_env(tmp_path, VLM_MODEL="no-such-org/no-such-vlm", **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    done = subprocess.run([sys.executable, "cli.py", "workers", "start", "--stages", "vlm_analyze", "--models", "real",
                           "--health-addr", ""], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot start" in done.stderr and "VLM_MODEL='no-such-org/no-such-vlm'" in done.stderr
    assert ("HF_HUB_OFFLINE" if offline else env["HF_ENDPOINT"]) in done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr


def test_a_cached_model_loads_while_the_hub_is_unreachable(tmp_path, onevision_checkpoint):
    """The hub down, the model in the Hugging Face cache: it loads from there, with no download attempt."""
    snapshot = tmp_path / "hf" / "hub" / "models--adflow-test--tiny-onevision" / "snapshots" / ("0" * 40)
    shutil.copytree(onevision_checkpoint, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = cli_env(tmp_path, VLM_MODEL="adflow-test/tiny-onevision", MODEL_PROFILE="real")
    code = ("from stages import models; b = models.load_vlm(); "
            "print(type(b.model).__name__, b.profile, b.name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LlavaOnevisionForConditionalGeneration", "real", "adflow-test/tiny-onevision"]
    assert "unreachable; loading the cached copy" in done.stderr and "Retrying" not in done.stderr


def test_real_model_path_that_does_not_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSLATION_MODEL", str(tmp_path / "missing"))
    with pytest.raises(models.ModelUnavailableError, match="TRANSLATION_MODEL=.*does not exist"):
        models.load_translator("real")


def test_real_translation_missing_offline(monkeypatch):
    monkeypatch.setenv("TRANSLATION_MODEL", "no-such-org/no-such-mt")
    with pytest.raises(models.ModelUnavailableError, match="TRANSLATION_MODEL"):
        models.load_translator("real")


def test_real_yolo_missing_offline_does_not_download(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YOLO_MODEL", "yolo-missing-for-test.pt")
    with pytest.raises(models.ModelUnavailableError, match="YOLO_MODEL='yolo-missing-for-test.pt'.*YOLO_OFFLINE"):
        models.load_yolo("real")
    assert not (tmp_path / "yolo-missing-for-test.pt").exists()


@pytest.fixture(scope="module")
def onevision_checkpoint(tmp_path_factory):
    """A tiny random LLaVA-OneVision saved like a hub checkpoint (tests/stages/test_real_path.py uses it
    through every stage)."""
    return save_onevision_checkpoint(tmp_path_factory.mktemp("vlm-checkpoint"))


def test_real_profile_refuses_a_checkpoint_without_weights(monkeypatch, onevision_checkpoint, tmp_path):
    folder = onevision_checkpoint
    for item in folder.iterdir():
        if not item.name.endswith(".safetensors"):
            (tmp_path / item.name).write_bytes(item.read_bytes())
    monkeypatch.setenv("VLM_MODEL", str(tmp_path))
    with pytest.raises(models.ModelUnavailableError, match="VLM_MODEL"):
        models.load_vlm("real")


def test_real_profile_refuses_a_checkpoint_with_missing_weights(monkeypatch, onevision_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = onevision_checkpoint
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "lm_head" in k or "layers.1" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setenv("VLM_MODEL", str(tmp_path))
    with pytest.raises(models.ModelUnavailableError, match="lacks 1 weights"):
        models.load_vlm("real")


def test_tiny_models_are_reproducible_and_cached():
    first = models.load_vlm("tiny")
    assert models.load_vlm("tiny") is first
    assert first.model.dtype == torch.float32
    rebuilt = models._tiny_vlm("cpu")  # a second build from the same seed
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(rebuilt.model.state_dict()[name], tensor), name


def test_concurrent_first_loads_load_once():
    calls = []

    def slow_loader():
        calls.append(1)
        time.sleep(0.2)
        return object()

    key = ("test", time.monotonic_ns())
    results = []
    threads = [threading.Thread(target=lambda: results.append(models._load_once(key, slow_loader))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 6 and all(r is results[0] for r in results)


def test_failed_load_is_not_cached():
    key = ("test-failure", time.monotonic_ns())
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk not mounted yet")
        return "model"

    with pytest.raises(OSError):
        models._load_once(key, flaky)
    assert models._load_once(key, flaky) == "model"


def test_oom_halves_the_batch_until_it_fits():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * 10 for x in items]

    assert models.run_halving_on_oom(fn, list(range(7))) == [x * 10 for x in range(7)]
    assert sizes == [7, 3, 1, 2, 4, 2, 2]  # halves of halves, never a failed batch of <= 2


def test_oom_on_a_single_item_is_raised():
    def fn(items):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        models.run_halving_on_oom(fn, [1])


def test_other_errors_are_not_retried():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError):
        models.run_halving_on_oom(fn, [1, 2, 3, 4])
    assert sizes == [4]


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_tiny_models_on_cuda_use_half_precision():
    bundle = models.load_vlm("tiny", "cuda")
    assert bundle.model.device.type == "cuda"
    assert bundle.model.dtype in (torch.bfloat16, torch.float16)
    assert models.load_yolo("tiny", "cuda").half
