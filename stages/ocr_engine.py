"""Tesseract engines for ocr_eval: in-process through tesserocr, or the tesseract CLI through pytesseract.

Both read one prepared line in single-line mode (PSM 7) with the default engine mode on the same
traineddata and give the same text (tests/stages/test_ocr_engine.py holds them to it). The
in-process engine keeps each language set loaded per thread: pytesseract starts a process per call
and reloads the models every time, which costs several times the reading itself.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Protocol

from PIL import Image

PSM_SINGLE_LINE = 7
CLI_CONFIG = f"--psm {PSM_SINGLE_LINE}"
# Where distributions put the traineddata; the tesserocr wheel bundles its own libtesseract but
# no language data, so it must be pointed at the system's.
TESSDATA_DIRS = (
    "/usr/share/tesseract-ocr/5/tessdata",  # Debian 12+, Ubuntu 22.04+
    "/usr/share/tesseract-ocr/4.00/tessdata",  # Debian 11, Ubuntu 20.04
    "/usr/share/tessdata",  # Fedora, Arch, Alpine
    "/usr/local/share/tessdata",  # built from source, Homebrew on Intel
    "/opt/homebrew/share/tessdata",  # Homebrew on Apple silicon
)
INSTALL_HINT = "Debian: apt-get install tesseract-ocr tesseract-ocr-eng tesseract-ocr-kor"


class TesseractUnavailable(RuntimeError):
    """Tesseract or a language pack is missing: fix the installation, the input is fine."""


class Engine(Protocol):
    name: str

    def languages(self) -> frozenset[str]: ...

    def read(self, line_img: Image.Image, lang: str) -> str: ...


def require(engine: Engine, lang: str) -> None:
    """Raises TesseractUnavailable naming the packs of lang ("kor+eng") that engine cannot load."""
    available = engine.languages()
    missing = [code for code in lang.split("+") if code not in available]
    if missing:
        raise TesseractUnavailable(
            f"tesseract language data missing: {', '.join(missing)} "
            f"(Debian: apt-get install {' '.join('tesseract-ocr-' + m for m in missing)})"
        )


class CliEngine:
    """pytesseract: one tesseract process per line. The fallback where tesserocr is not installed."""

    name = "pytesseract"

    @functools.cached_property
    def _languages(self) -> frozenset[str]:
        import pytesseract

        try:
            pytesseract.get_tesseract_version()
            return frozenset(pytesseract.get_languages(config=""))
        except pytesseract.TesseractNotFoundError:
            raise TesseractUnavailable(
                f"tesseract is not installed or not on PATH ({INSTALL_HINT}); ocr_eval cannot run here"
            ) from None

    def languages(self) -> frozenset[str]:
        return self._languages

    def read(self, line_img: Image.Image, lang: str) -> str:
        import pytesseract

        require(self, lang)
        return pytesseract.image_to_string(line_img, lang=lang, config=CLI_CONFIG)


def find_tessdata(candidates: tuple[str, ...] | None = None) -> Path:
    """The first directory holding *.traineddata: TESSDATA_PREFIX if set (Tesseract's own variable),
    else the distributions' usual places."""
    prefix = os.environ.get("TESSDATA_PREFIX")
    looked = [prefix] if prefix else list(TESSDATA_DIRS if candidates is None else candidates)
    for directory in looked:
        path = Path(directory)
        if path.is_dir() and any(path.glob("*.traineddata")):
            return path
    raise TesseractUnavailable(
        f"tesseract is not installed: no language data in {', '.join(looked)} "
        f"({INSTALL_HINT}, or set TESSDATA_PREFIX to the tessdata directory); ocr_eval cannot run here"
    )


class InProcessEngine:
    """tesserocr: Tesseract's C API in this process, one loaded API object per language set per thread.

    An API object must not be used by two threads at once, and loading one costs 0.1-0.3 s, so
    each worker thread keeps its own, created on first use and reused for every line after. tesserocr
    releases the GIL while Tesseract recognises, so the worker's threads read in parallel.
    """

    name = "tesserocr"

    def __init__(self, tessdata: str | Path | None = None) -> None:
        import tesserocr  # ImportError here is what makes default_engine() fall back

        self._tesserocr = tesserocr
        self._tessdata = Path(tessdata) if tessdata is not None else None
        self._local = threading.local()
        self._lock = threading.Lock()

    @functools.cached_property
    def tessdata(self) -> Path:
        return self._tessdata if self._tessdata is not None else find_tessdata()

    @functools.cached_property
    def _languages(self) -> frozenset[str]:
        _, names = self._tesserocr.get_languages(f"{self.tessdata}{os.sep}")
        return frozenset(names)

    def languages(self) -> frozenset[str]:
        # cached_property has no lock of its own: the first stage calls can race here.
        with self._lock:
            return self._languages

    def api(self, lang: str):
        """This thread's API object for lang, loaded on first use."""
        apis = getattr(self._local, "apis", None)
        if apis is None:
            apis = self._local.apis = {}
        api = apis.get(lang)
        if api is None:
            require(self, lang)
            tesserocr = self._tesserocr
            try:
                api = tesserocr.PyTessBaseAPI(
                    path=f"{self.tessdata}{os.sep}", lang=lang,
                    psm=tesserocr.PSM.SINGLE_LINE, oem=tesserocr.OEM.DEFAULT,
                )
            except RuntimeError as exc:  # traineddata present but unreadable, e.g. truncated
                raise TesseractUnavailable(
                    f"tesseract could not load {lang} from {self.tessdata}: {exc} ({INSTALL_HINT})"
                ) from None
            apis[lang] = api
        return api

    def read(self, line_img: Image.Image, lang: str) -> str:
        api = self.api(lang)
        api.SetImage(line_img)
        try:
            return api.GetUTF8Text()
        finally:
            api.Clear()  # the next line's image replaces it anyway; drop this one's results now


@functools.lru_cache(maxsize=1)
def default_engine() -> Engine:
    """The in-process engine where tesserocr imports, else the CLI one."""
    try:
        return InProcessEngine()
    except ImportError:
        return CliEngine()
