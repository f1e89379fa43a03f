"""Safe image decoding and encoding shared by every stage, plus the colour arithmetic of WCAG.

Images come from a generator outside this project, so any byte string may arrive: each way it can be
unusable becomes a PermanentStageError that names the problem, and every usable image comes out as
8-bit sRGB RGB with its EXIF orientation applied, so all stages see the same pixels at the same size.
"""

from __future__ import annotations

import functools

import io
import os
import struct
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stages.contract import PermanentStageError

DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 32
MAX_ASPECT_RATIO = 20.0
WHITE = (255, 255, 255)


def max_image_pixels() -> int:
    """The decompression-bomb limit: env MAX_IMAGE_PIXELS, else DEFAULT_MAX_PIXELS."""
    raw = os.environ.get("MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"MAX_IMAGE_PIXELS must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"MAX_IMAGE_PIXELS must be a positive integer, got {raw!r}")
    return value


# The formats an image may arrive in: what image generators write and Instagram takes. (Pillow's
# JPEG plugin also opens multi-picture JPEGs from cameras, which report the format "MPO".)
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


def _open_header(data: bytes) -> Image.Image:
    """Opens `data` lazily (the header only) with Pillow's own plugins for ALLOWED_FORMATS.

    Not through PIL.Image.open: ultralytics replaces that function when it is imported (to add
    HEIF through pi_heif), and its replacement answers bytes Pillow cannot identify with
    `No module named 'pi_heif'` or a pip install instead of our message. This is what
    Image.open does inside (each plugin's accept() on the first bytes, then its factory), over
    the plugin registry Image.OPEN, which the patch leaves alone. It also skips Pillow's own
    decompression-bomb check: ours below quotes our MAX_IMAGE_PIXELS, not Pillow's limit.
    """
    Image.preinit()  # registers PNG and JPEG
    if any(fmt not in Image.OPEN for fmt in ALLOWED_FORMATS):
        Image.init()  # WebP and the rest
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:
        if fmt not in Image.OPEN:  # pragma: no cover - a Pillow built without WebP
            continue
        factory, accept = Image.OPEN[fmt]
        result = accept(prefix) if accept else True
        if isinstance(result, str) or not result:  # a str is Pillow's "mine, but unsupported here"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # how a plugin says "not mine after all"; Image.open moves on likewise
    raise UnidentifiedImageError(_identify(prefix))


def _identify(prefix: bytes) -> str | None:
    """The name of a format Pillow knows but we do not accept, for the message."""
    Image.init()
    for fmt, (_factory, accept) in Image.OPEN.items():
        try:
            result = accept(prefix) if accept else False
            if fmt not in ALLOWED_FORMATS and result and not isinstance(result, str):
                return fmt
        except Exception:  # pragma: no cover - an accept() that trips over a short prefix
            continue
    return None


def open_checked(data: bytes | bytearray | memoryview | None) -> Image.Image:
    """Untrusted bytes decoded (not yet converted) after every check that needs no colour work:
    type, size 0, format in ALLOWED_FORMATS, the pixel limit from the header alone, the
    geometry, then the full decode. Each refusal is a PermanentStageError naming the problem."""
    if data is None:
        raise PermanentStageError("no image: the variant has no image bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PermanentStageError(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise PermanentStageError("image is empty (0 bytes)")

    limit = max_image_pixels()
    accepted = ", ".join(ALLOWED_FORMATS[:-1]) + " or " + ALLOWED_FORMATS[-1]
    try:
        with warnings.catch_warnings():
            # Our own limit decides below; Pillow's warning would only add noise to the logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_header(data)  # lazy: reads the header only
    except UnidentifiedImageError as exc:
        if exc.args and exc.args[0]:
            raise PermanentStageError(f"image format {exc.args[0]} is not accepted: use {accepted}") from None
        raise PermanentStageError(
            f"not a recognised image format: not {accepted} ({len(data)} bytes, starting {data[:8]!r})"
        ) from None
    except Exception as exc:  # a malformed header can raise nearly anything inside a plugin
        raise PermanentStageError(f"image header is corrupt: {type(exc).__name__}: {exc}") from None

    width, height = img.size
    if width * height > limit:
        raise PermanentStageError(
            f"image refused as a decompression bomb: {width}x{height} = {width * height} pixels "
            f"exceeds the limit of {limit} (MAX_IMAGE_PIXELS)"
        )
    _check_geometry(width, height)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # truncated streams surface as OSError, SyntaxError, ValueError...
        raise PermanentStageError(
            f"image data is truncated or corrupt ({img.format or 'unknown'} {width}x{height}, "
            f"{len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from None
    return img


def check_image(data: bytes | bytearray | memoryview | None) -> tuple[str, int, int]:
    """(format, width, height) of an image every stage will accept, else PermanentStageError:
    what `submit` runs on each file, so bad images are refused before a job exists."""
    img = open_checked(data)
    return img.format or "unknown", img.width, img.height


IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}


def image_mime(data: bytes) -> str:
    """The MIME type of an image every stage will accept, else ValueError naming why: the check
    `submit` gives outbox.jobs.submit_job (check_image), which knows nothing of images."""
    try:
        image_format = check_image(data)[0]
    except PermanentStageError as exc:
        raise ValueError(str(exc)) from None
    return IMAGE_MIME.get(image_format, "application/octet-stream")


def load_image(data: bytes | bytearray | memoryview | None) -> Image.Image:
    """Decodes untrusted bytes into an RGB image, refusing anything a later stage could not use."""
    img = open_checked(data)
    try:
        img = ImageOps.exif_transpose(img)
        rgb = _to_srgb_rgb(img)
    except PermanentStageError:
        raise
    except Exception as exc:
        raise PermanentStageError(
            f"image could not be converted to RGB (mode {img.mode}): {type(exc).__name__}: {exc}"
        ) from None
    _check_geometry(*rgb.size)
    return rgb


def _check_geometry(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise PermanentStageError(
            f"image too small: {width}x{height}, each side must be at least {MIN_SIDE} px"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise PermanentStageError(
            f"image aspect ratio too extreme: {width}x{height} is {ratio:.1f}:1, "
            f"the limit is {MAX_ASPECT_RATIO:g}:1"
        )


def _to_srgb_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
        mode = img.mode
    if mode == "P":
        # A palette may carry transparency in info["transparency"]; RGBA keeps it for compositing.
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, WHITE + (255,))
        return Image.alpha_composite(background, img).convert("RGB")

    icc = img.info.get("icc_profile")
    if icc and mode in ("RGB", "CMYK"):
        converted = _icc_to_srgb(img, icc)
        if converted is not None:
            return converted
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        # Float images are either 0..1 or already on the 0..255 scale.
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    elif img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0
    else:
        # 32-bit "I" is how Pillow may hand over 16-bit PNGs; only rescale when values need it.
        arr = arr.astype(np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _icc_to_srgb(img: Image.Image, icc: bytes) -> Image.Image | None:
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
    except Exception:
        # A broken or unsupported profile is common in generated files; the plain conversion
        # below is still a valid image, only less colour-accurate.
        return None


def artifact_image(
    read_artifact: Callable[[str], bytes], result: Mapping[str, Any] | None, name: str, owner: str
) -> Image.Image:
    """Decodes the image artifact `name` that an earlier stage (`owner`) recorded in its result."""
    key = ((result or {}).get("artifacts") or {}).get(name)
    if not key:
        raise PermanentStageError(f"the {owner} result names no {name} artifact")
    return load_image(read_artifact(key))


def srgb_icc_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)  # level 6+ costs seconds on large photos for a few %
    return buf.getvalue()


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Baseline JPEG with an embedded sRGB profile, so viewers do not guess the colour space."""
    buf = io.BytesIO()
    img.convert("RGB").save(
        buf, format="JPEG", quality=quality, optimize=True, icc_profile=srgb_icc_profile()
    )
    return buf.getvalue()


def downscaled(img: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """A bilinear copy whose longer side is at most max_side (the image itself when it already
    fits), and the scale from the image to it: the analysis thumbnails of the planner, the face
    search and the image-quality measure."""
    scale = min(1.0, max_side / max(img.size))
    if scale >= 1.0:
        return img, 1.0
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR), scale


def rgb_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64)


def grey_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


LUMA_601 = np.array([0.299, 0.587, 0.114])  # the weights of Pillow's "L" conversion


def luma(rgb: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Grey level(s) of RGB colour(s), matching grey_array; the last axis holds R, G, B."""
    grey = np.asarray(rgb, dtype=np.float64) @ LUMA_601
    return float(grey) if grey.ndim == 0 else grey


# --- colours and WCAG 2.x ---------------------------------------------------------------------


def hex_to_rgb(value: str) -> tuple[int, int, int]:
    text = value.strip().lstrip("#")
    if len(text) == 3:
        text = "".join(ch * 2 for ch in text)
    if len(text) != 6:
        raise ValueError(f"not a #rrggbb colour: {value!r}")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def parse_colour(value: Any, what: str) -> tuple[int, int, int]:
    """hex_to_rgb for colours read from another stage's result: bad values are permanent errors."""
    try:
        return hex_to_rgb(str(value))
    except ValueError:
        raise PermanentStageError(f"{what} is not a #rrggbb colour: {value!r}") from None


def rgb_to_hex(rgb: Iterable[float]) -> str:
    r, g, b = (int(round(min(255, max(0, c)))) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _linear(c: np.ndarray) -> np.ndarray:
    """sRGB (0-1) to linear light, WCAG 2.x."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)
_LINEAR_8BIT = _linear(np.arange(256) / 255.0)


def relative_luminance(rgb: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """WCAG 2.x relative luminance of 8-bit sRGB colour(s); the last axis holds R, G, B."""
    linear = _linear(np.asarray(rgb, dtype=np.float64) / 255.0)
    lum = linear[..., 0] * LUMA_WEIGHTS[0] + linear[..., 1] * LUMA_WEIGHTS[1] + linear[..., 2] * LUMA_WEIGHTS[2]
    return float(lum) if lum.ndim == 0 else lum


def luminance_8bit(rgb: np.ndarray) -> np.ndarray:
    """relative_luminance of a uint8 image (h x w x 3) through a 256-entry table: a lookup per
    pixel instead of a power."""
    return (_LINEAR_8BIT[rgb[..., 0]] * LUMA_WEIGHTS[0] + _LINEAR_8BIT[rgb[..., 1]] * LUMA_WEIGHTS[1]
            + _LINEAR_8BIT[rgb[..., 2]] * LUMA_WEIGHTS[2])


@functools.lru_cache(maxsize=4096)
def colour_luminance(rgb: tuple) -> float:
    """relative_luminance of one colour, remembered: a palette's colours come back for every block
    (numpy's overhead on three numbers was 9 ms of the planner's 52 per variant)."""
    return relative_luminance(rgb)


def contrast_ratio(lum_a: float | np.ndarray, lum_b: float | np.ndarray) -> np.ndarray | float:
    hi = np.maximum(lum_a, lum_b)
    lo = np.minimum(lum_a, lum_b)
    ratio = (hi + 0.05) / (lo + 0.05)
    return float(ratio) if np.ndim(ratio) == 0 else ratio


WORST_SHARE = 0.10
WCAG_AA_NORMAL = 4.5  # minimum contrast for normal text (WCAG 2.x, level AA)
WCAG_AA_LARGE = 3.0  # minimum contrast for large text


def worst_contrast(text_rgb: Sequence[float], background_lum: np.ndarray) -> float:
    """Contrast of the text colour against the WORST_SHARE of background pixels closest to it.

    The mean would let a light patch right behind the text hide inside a dark surround; the value
    returned is the contrast that all but the worst 10% of the background pixels reach or beat.
    """
    lum = np.asarray(background_lum, dtype=np.float64).ravel()
    if lum.size == 0:
        raise ValueError("no background pixels to measure contrast against")
    ratios = np.asarray(contrast_ratio(relative_luminance(text_rgb), lum))
    return float(np.quantile(ratios, WORST_SHARE, method="lower"))


class ContrastTable:
    """worst_contrast for many text colours against one background, with the same answers: the
    background's luminances sorted once, then O(background / 10) per colour instead of a
    contrast and a quantile over every pixel (the planner tries thirty colours per block: 20 ms
    of its 95 ms per variant went to that).

    The contrast against a background luminance b falls as b nears the text's luminance a from
    either side, so the WORST_SHARE lowest contrasts are the pixels nearest a in sorted order:
    at most k + 1 on each side of a's place, where k is np.quantile's "lower" index.
    """

    def __init__(self, background_lum: np.ndarray):
        lum = np.sort(np.asarray(background_lum, dtype=np.float64).ravel())
        if lum.size == 0:
            raise ValueError("no background pixels to measure contrast against")
        self.lum = lum
        self.k = int(np.floor(WORST_SHARE * (lum.size - 1)))

    def worst(self, text_rgb: Sequence[float]) -> float:
        a = colour_luminance(tuple(text_rgb))
        pos = int(np.searchsorted(self.lum, a))
        k = self.k
        near = np.concatenate((self.lum[max(0, pos - k - 1):pos], self.lum[pos:pos + k + 1]))
        return float(np.partition(np.asarray(contrast_ratio(a, near)), k)[k])


def parse_canvas(raw: Any, photo_size: tuple[int, int] | None = None) -> dict | None:
    """The planner's canvas extension (a band outside the photo for the copy), checked against the
    photo it extends when its size is known: {"size": [W, H], "offset": [x, y], "photo_size": [w, h],
    "color": "#rrggbb"}, the photo pasted at offset on a W x H canvas of that colour. None: no
    extension."""
    if not raw:
        return None
    try:
        size = [int(v) for v in raw["size"]]
        offset = [int(v) for v in raw["offset"]]
        photo = [int(v) for v in raw["photo_size"]]
        colour = parse_colour(raw["color"], "canvas color")
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentStageError(f"planner canvas extension is malformed: {type(exc).__name__}: {exc}") from None
    if photo_size is not None and tuple(photo) != tuple(photo_size):
        raise PermanentStageError(f"canvas extension is for a {photo[0]}x{photo[1]} photo, the image is "
                                  f"{photo_size[0]}x{photo_size[1]}")
    if not (0 <= offset[0] and 0 <= offset[1] and offset[0] + photo[0] <= size[0] and offset[1] + photo[1] <= size[1]):
        raise PermanentStageError(f"canvas extension {size} does not hold the photo at {offset}")
    return {"size": size, "offset": offset, "photo_size": photo, "color": rgb_to_hex(colour)}


def extend_canvas(img: Image.Image, canvas: Mapping[str, Any]) -> Image.Image:
    """The photo on its extended canvas (parse_canvas's result): overlay draws on this, and
    readability_eval rebuilds it to know what the text was drawn on."""
    out = Image.new("RGB", tuple(canvas["size"]), hex_to_rgb(canvas["color"]))
    out.paste(img.convert("RGB"), tuple(canvas["offset"]))
    return out


def blend_box(img: Image.Image, box: Sequence[int], rgb: Sequence[int], alpha: float) -> Image.Image:
    """A copy of img with a flat colour laid over box at the given opacity (a scrim).

    Done in numpy with one rounding so that an evaluator can rebuild the exact same pixels.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    arr = np.asarray(img.convert("RGB"), dtype=np.float64).copy()
    region = arr[y1:y2, x1:x2]
    arr[y1:y2, x1:x2] = region * (1.0 - alpha) + np.asarray(rgb, dtype=np.float64) * alpha
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
