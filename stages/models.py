"""Model profiles, device placement and loading for the model stages.

Two profiles:
- `real` (the default): pretrained weights named by VLM_MODEL, YOLO_MODEL and TRANSLATION_MODEL
  (hub ids or local paths). Missing weights stop the load with a message naming the variable to set;
  nothing ever falls back to random weights.
- `tiny`: small random-weight models of the same architectures built in this process, for tests and
  for running the whole pipeline on a machine without weights. Their outputs mean nothing, and every
  result they produce says so (see profile_marker).

Models load lazily, once per process and (profile, device), under a lock per model, so concurrent
first calls do not load twice. torch, transformers and ultralytics are imported only inside the
loaders: importing this module (as the registry and the CLI do) stays cheap.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

log = logging.getLogger(__name__)

PROFILES = ("real", "tiny")
DEVICES = ("cpu", "cuda")
TINY_WARNING = "random-weight tiny model: output is not meaningful"
DEFAULT_VLM_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEFAULT_YOLO_MODEL = "yolo11n.pt"
DEFAULT_TRANSLATION_MODEL = "Helsinki-NLP/opus-mt-tc-big-en-ko"
TINY_VLM_NAME = "tiny-llava (random weights)"
TINY_YOLO_NAME = "yolo11n.yaml (random weights)"
TINY_TRANSLATION_NAME = "tiny-marian (random weights)"
_TRUE = {"1", "true", "yes", "on"}


class ModelUnavailableError(RuntimeError):
    """The configured weights cannot be loaded; the message names the setting to change."""


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist in this process."""


def resolve_profile(profile: str | None = None) -> str:
    value = (profile or os.environ.get("MODEL_PROFILE") or "real").strip().lower()
    if value not in PROFILES:
        raise ValueError(f"unknown model profile {value!r} (MODEL_PROFILE): use one of {', '.join(PROFILES)}")
    return value


def check_device_name(device: str) -> str:
    """Validates the spelling only, without importing torch."""
    value = (device or "cpu").strip().lower()
    if value not in DEVICES:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    return value


def resolve_device(device: str) -> str:
    value = check_device_name(device)
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device 'cuda' was requested but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
                "run on a GPU machine, or use --device cpu"
            )
    return value


def profile_marker(profile: str) -> dict[str, str]:
    """The fields every model stage adds to its result, so random-weight output is never mistaken."""
    if profile == "tiny":
        return {"profile": "tiny", "warning": TINY_WARNING}
    return {"profile": profile}


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def yolo_offline() -> bool:
    return offline() or os.environ.get("YOLO_OFFLINE", "").strip().lower() in _TRUE


def model_names(profile: str | None = None) -> dict[str, str]:
    if resolve_profile(profile) == "tiny":
        return {"vlm": TINY_VLM_NAME, "yolo": TINY_YOLO_NAME, "translation": TINY_TRANSLATION_NAME}
    return {
        "vlm": os.environ.get("VLM_MODEL") or DEFAULT_VLM_MODEL,
        "yolo": os.environ.get("YOLO_MODEL") or DEFAULT_YOLO_MODEL,
        "translation": os.environ.get("TRANSLATION_MODEL") or DEFAULT_TRANSLATION_MODEL,
    }


def describe_profile(profile: str | None = None) -> str:
    """One line for a worker's startup log."""
    name = resolve_profile(profile)
    models = model_names(name)
    listed = f"VLM={models['vlm']}, YOLO={models['yolo']}, translation={models['translation']}"
    if name == "tiny":
        return (
            f"model profile: tiny - RANDOM-WEIGHT tiny models built in-process ({listed}); "
            "their outputs are NOT meaningful and every result is marked profile=tiny"
        )
    source = "local files only (offline)" if offline() else "hub or local paths"
    return f"model profile: real - pretrained weights, {source}: {listed}"


# --- bundles and the per-process cache ------------------------------------------------------------

@dataclass
class VlmBundle:
    model: Any
    processor: Any
    tokenizer: Any
    name: str
    profile: str
    device: str
    eos_ids: list[int]
    # The tokenizer as the guidance library sees it, and each schema compiled for it (stages.vlm.guide_for).
    guides: dict = field(default_factory=dict)
    guides_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class YoloBundle:
    model: Any
    name: str
    profile: str
    device: str
    half: bool
    imgsz: int
    # An ultralytics model keeps per-call predictor state: one predict at a time per model.
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class TranslatorBundle:
    model: Any
    tokenizer: Any
    name: str
    profile: str
    device: str


_cache: dict[tuple, Any] = {}
_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


def _load_once(key: tuple, loader: Callable[[], Any]) -> Any:
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _cache:
            _cache[key] = loader()  # a failure is not cached: fixing the setting and retrying works
        return _cache[key]


def loaded_models() -> list[tuple]:
    return list(_cache)


def load_vlm(profile: str | None = None, device: str = "cpu") -> VlmBundle:
    profile, device = resolve_profile(profile), resolve_device(device)
    name = model_names(profile)["vlm"]
    loader = (lambda: _tiny_vlm(device)) if profile == "tiny" else (lambda: _real_vlm(name, device))
    return _load_once(("vlm", profile, device, name), loader)


def load_yolo(profile: str | None = None, device: str = "cpu") -> YoloBundle:
    profile, device = resolve_profile(profile), resolve_device(device)
    name = model_names(profile)["yolo"]
    loader = (lambda: _tiny_yolo(device)) if profile == "tiny" else (lambda: _real_yolo(name, device))
    return _load_once(("yolo", profile, device, name), loader)


def load_translator(profile: str | None = None, device: str = "cpu") -> TranslatorBundle:
    profile, device = resolve_profile(profile), resolve_device(device)
    name = model_names(profile)["translation"]
    loader = (lambda: _tiny_translator(device)) if profile == "tiny" else (lambda: _real_translator(name, device))
    return _load_once(("translation", profile, device, name), loader)


def _dtype(device: str):
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --- real weights -----------------------------------------------------------------------------------

# Long enough for a hub across the world (a TCP handshake, not a download), short enough that a
# worker with nothing to load learns it at once.
HUB_CONNECT_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    """The hub the download client will call (HF_ENDPOINT, as huggingface_hub read it)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _address(url: str) -> tuple[str, int]:
    """Where a connection to url goes first: its proxy, if one is configured for it."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    proxy = None if proxy_bypass(parts.hostname or "") else getproxies().get(parts.scheme)
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    return target.hostname or "", target.port or (443 if target.scheme == "https" else 80)


def reachable(url: str, timeout: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to url (or its proxy) opens within the timeout. The download
    clients retry a refused or silent server with back-off for minutes before giving up; a worker
    whose weights are not on disk should learn in seconds that nothing can be downloaded."""
    import socket

    host, port = _address(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def in_hf_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of repo_id (its config.json, at least)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


@dataclass(frozen=True)
class HfSource:
    ref: str  # what from_pretrained gets
    local_only: bool  # no network: a local directory, or the cache when downloads are off or impossible
    where: str  # for messages


def hf_source(name: str, env_var: str) -> HfSource:
    """Where the weights env_var names will come from, decided before any model library is called:
    a missing local path, or a hub id that is neither cached nor downloadable, fails here at once."""
    if os.path.isdir(name):
        return HfSource(name, True, "local directory")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelUnavailableError(
            f"{env_var}={name!r} is a path that does not exist: point {env_var} at the model's directory")
    cached = in_hf_cache(name)
    if offline():
        if not cached:
            raise ModelUnavailableError(
                f"{env_var}={name!r} is not in the local Hugging Face cache ({hf_cache_dir()}) and downloads "
                f"are off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE). {_how_to_fix(env_var)}")
        return HfSource(name, True, "Hugging Face cache (offline)")
    endpoint = hub_endpoint()
    if not reachable(endpoint):
        if cached:
            log.warning("%s=%r: the hub %s is unreachable; loading the cached copy", env_var, name, endpoint)
            return HfSource(name, True, f"Hugging Face cache (hub {endpoint} unreachable)")
        raise ModelUnavailableError(
            f"{env_var}={name!r} is not in the local Hugging Face cache ({hf_cache_dir()}) and the hub "
            f"{endpoint} (HF_ENDPOINT) is unreachable: no connection within {HUB_CONNECT_TIMEOUT_S:g} s. "
            f"{_how_to_fix(env_var)}")
    return HfSource(name, False, f"hub {endpoint}")


def _how_to_fix(env_var: str) -> str:
    return (f"Set {env_var} to a local model directory (config and weights) or download it into the cache; "
            "MODEL_PROFILE=tiny runs random-weight test models instead")


def _unavailable(what: str, env_var: str, name: str, source: HfSource, exc: BaseException) -> ModelUnavailableError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ModelUnavailableError(
        f"{what} weights {env_var}={name!r} could not be loaded from the {source.where}: "
        f"{type(exc).__name__}: {first}. {_how_to_fix(env_var)}"
    )


def _refuse_missing_weights(what: str, env_var: str, name: str, info: dict) -> None:
    """from_pretrained initialises absent weights randomly and only warns; a real profile must not."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelUnavailableError(
            f"{what} checkpoint {env_var}={name!r} lacks {len(missing)} weights (e.g. {missing[:3]}): "
            "they would be random. Point it at a complete checkpoint"
        )


def _pretrained(what: str, env_var: str, name: str, source: HfSource, device: str, load_companion: Callable,
                model_class) -> tuple:
    """(companion, model) from a hub id or local directory: the processor or tokenizer, then the
    model; a clear error naming env_var when they are missing or incomplete."""
    try:
        companion = load_companion(source.ref, local_files_only=source.local_only)
        model, info = model_class.from_pretrained(
            source.ref, dtype=_dtype(device), local_files_only=source.local_only, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise _unavailable(what, env_var, name, source, exc) from exc
    _refuse_missing_weights(what, env_var, name, info)
    return companion, model


def _real_vlm(name: str, device: str) -> VlmBundle:
    source = hf_source(name, "VLM_MODEL")  # before transformers is imported: missing weights fail at once
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor, model = _pretrained("VLM", "VLM_MODEL", name, source, device, AutoProcessor.from_pretrained,
                                   AutoModelForImageTextToText)
    return _vlm_bundle(model, processor, processor.tokenizer, name, "real", device)


def _vlm_bundle(model, processor, tokenizer, name: str, profile: str, device: str) -> VlmBundle:
    tokenizer.padding_side = "left"  # batched generate continues every row from its last real token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id} - {None})
    model.to(device).eval()
    return VlmBundle(model, processor, tokenizer, name, profile, device, eos_ids)


def keep_ultralytics_offline() -> None:
    """Ultralytics checks for updates, installs missing packages and downloads a font to draw
    labels unless told otherwise: none of that may happen on a worker. Its settings folder gets a
    local Korean-capable TTF under the names it looks for. Called before ultralytics is imported."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    if not os.environ.get("YOLO_CONFIG_DIR"):
        import shutil

        from stages.fonts import font_path

        folder = Path(tempfile.gettempdir()) / f"adflow-ultralytics-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (folder / name).exists():
                shutil.copyfile(font_path(), folder / name)
        os.environ["YOLO_CONFIG_DIR"] = str(folder)


def _yolo_local_path(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    try:
        from ultralytics.utils import SETTINGS

        candidate = Path(SETTINGS["weights_dir"]) / path.name
        return candidate if candidate.is_file() else None
    except Exception:  # settings unreadable: only the explicit path counts
        return None


YOLO_DOWNLOAD_HOST = "https://github.com"  # ultralytics' release assets


def _real_yolo(name: str, device: str) -> YoloBundle:
    keep_ultralytics_offline()
    local = _yolo_local_path(name)
    if local is None and yolo_offline():
        # Ultralytics would otherwise try to download the file from the internet.
        raise ModelUnavailableError(
            f"YOLO weights YOLO_MODEL={name!r} are not a local file (nor in ultralytics' weights_dir) and "
            "downloads are off (YOLO_OFFLINE/HF_HUB_OFFLINE): set YOLO_MODEL to the path of a .pt file; "
            "MODEL_PROFILE=tiny runs a random-weight YOLO instead"
        )
    if local is None and not reachable(YOLO_DOWNLOAD_HOST):
        raise ModelUnavailableError(
            f"YOLO weights YOLO_MODEL={name!r} are not a local file and {YOLO_DOWNLOAD_HOST}, where ultralytics "
            "downloads them from, is unreachable: set YOLO_MODEL to the path of a .pt file"
        )
    from ultralytics import YOLO

    try:
        model = YOLO(str(local or name), task="detect")
    except Exception as exc:  # ultralytics raises plain Exceptions for missing or broken files
        raise ModelUnavailableError(
            f"YOLO weights YOLO_MODEL={name!r} could not be loaded: {type(exc).__name__}: {exc}. "
            "Set YOLO_MODEL to the path of a .pt file"
        ) from exc
    return _yolo_bundle(model, name, "real", device, imgsz=640)


def _yolo_bundle(model, name: str, profile: str, device: str, imgsz: int) -> YoloBundle:
    imgsz = int(os.environ.get("YOLO_IMGSZ") or imgsz)
    model.to(device)
    return YoloBundle(model, name, profile, "cuda:0" if device == "cuda" else "cpu", device == "cuda", imgsz)


def _real_translator(name: str, device: str) -> TranslatorBundle:
    source = hf_source(name, "TRANSLATION_MODEL")
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer, model = _pretrained("Translation", "TRANSLATION_MODEL", name, source, device,
                                   AutoTokenizer.from_pretrained, AutoModelForSeq2SeqLM)
    model.to(device).eval()
    return TranslatorBundle(model, tokenizer, name, "real", device)


# --- tiny random-weight models ---------------------------------------------------------------------
# Built from fixed seeds, so two processes get identical models and tests can compare outputs.

_TINY_CORPUS = (
    'Answer with one JSON object only: {"usable": true, "reasons": ["sharp product", "clean background"], '
    '"description": "a red sneaker on a white table", "main_subject": "sneaker", '
    '"dominant_colors": ["red", "white"]}',
    '{"scores": {"layout": 8, "legibility": 7, "product_visibility": 9, "overall": 8}, '
    '"verdict": "pass", "reasons": "text is readable and the product is visible"}',
    "You are checking an AI-generated image before it is used in an Instagram ad. Is the image usable? "
    "Describe the main subject and the dominant colours. The ad copy is rendered on the image.",
    "Score the layout, legibility and product visibility from 1 to 10. verdict pass or fail, false, "
    "blue green black yellow orange purple pink grey brown 0123456789",
)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_TINY_IMAGE_SIZE = 32
_TINY_PATCH = 8


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_vlm_tokenizer():
    """A byte-level BPE trained here on a few lines: multi-character tokens, like the real ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(_TINY_CORPUS), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def _tiny_vlm(device: str) -> VlmBundle:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_vlm_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _TINY_IMAGE_SIZE},
        crop_size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=_TINY_IMAGE_SIZE, patch_size=_TINY_PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = _seeded(0, lambda: LlavaForConditionalGeneration(config))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(_dtype(device))
    return _vlm_bundle(model, processor, tokenizer, TINY_VLM_NAME, "tiny", device)


def _tiny_yolo(device: str) -> YoloBundle:
    keep_ultralytics_offline()
    from ultralytics import YOLO

    # The architecture file ships inside ultralytics: building from it needs no download.
    model = _seeded(0, lambda: YOLO("yolo11n.yaml", task="detect"))
    return _yolo_bundle(model, TINY_YOLO_NAME, "tiny", device, imgsz=128)


_TINY_TRANSLATION_CORPUS = (
    "Get 50% off the new Nike Air shoes today at www.example.com #sale",
    "Fresh coffee every morning for only $4.99. Visit us now!",
    "오늘 새로운 신발을 50% 할인된 가격으로 만나보세요",
    "매일 아침 신선한 커피를 단 4.99달러에 즐기세요. 지금 방문하세요!",
    "ZQX0 ZQX1 ZQX2 ZQX3 ZQX4 ZQX5 ZQX6 ZQX7 ZQX8 ZQX9 한정 판매 특가 무료 배송",
)


def _tiny_translator(device: str) -> TranslatorBundle:
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    # A SentencePiece model trained here on English and Korean lines, so the tokenizer is a real
    # MarianTokenizer exercising the same code path as the opus-mt models.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_TRANSLATION_CORPUS), model_writer=buffer, vocab_size=120,
        model_type="unigram", character_coverage=1.0, eos_id=0, unk_id=1, bos_id=-1, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2,
    )
    with tempfile.TemporaryDirectory(prefix="tiny-marian-") as folder:
        spm_path = Path(folder, "source.spm")
        spm_path.write_bytes(buffer.getvalue())
        processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
        vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        vocab["<pad>"] = len(vocab)
        vocab_path = Path(folder, "vocab.json")
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        tokenizer = MarianTokenizer(source_spm=str(spm_path), target_spm=str(spm_path), vocab=str(vocab_path))
    pad = tokenizer.pad_token_id
    config = MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=256, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=pad, forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = _seeded(0, lambda: MarianMTModel(config))
    model.to(device=device, dtype=_dtype(device)).eval()
    return TranslatorBundle(model, tokenizer, TINY_TRANSLATION_NAME, "tiny", device)


# --- batches that do not fit -------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


def run_halving_on_oom(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn over items; when CUDA runs out of memory, the same work in two halves, recursively.

    Only a single item that still does not fit raises: the engine then retries that task later.
    """
    import torch

    items = list(items)
    try:
        return fn(items)
    except torch.cuda.OutOfMemoryError:
        if len(items) <= 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    log.warning("CUDA out of memory on a batch of %d: retrying as %d + %d", len(items), half, len(items) - half)
    return run_halving_on_oom(fn, items[:half]) + run_halving_on_oom(fn, items[half:])
