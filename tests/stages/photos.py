"""The photographs that ship inside installed packages (ultralytics, matplotlib), for stage tests."""
from pathlib import Path

import pytest
from PIL import Image

SITE = Path(Image.__file__).resolve().parent.parent  # site-packages


def photo(relative: str) -> Image.Image:
    """A package's photograph by its path under site-packages; skips the test where it is absent."""
    path = SITE / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not installed here")
    return Image.open(path).convert("RGB")
