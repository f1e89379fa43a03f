"""The image-quality term of the best-variant rule, on real photographs and their spoilt copies."""
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from console.samples import sample_images
from stages import image_quality
from tests.stages.photos import photo


@pytest.mark.parametrize("relative", ["ultralytics/assets/bus.jpg", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"])
def test_a_darkened_or_blurred_copy_scores_below_the_photograph(relative):
    img = photo(relative)
    good = image_quality.measure(img)
    dark = image_quality.measure(ImageEnhance.Brightness(img).enhance(0.3))
    blurred = image_quality.measure(img.filter(ImageFilter.GaussianBlur(max(img.size) / 150)))  # soft at any scale
    assert good["exposure"]["score"] >= 0.8 and good["sharpness"]["score"] >= 0.9, good
    assert dark["exposure"]["score"] < good["exposure"]["score"] - 0.5
    assert blurred["sharpness"]["score"] < good["sharpness"]["score"] - 0.5
    assert dark["score"] < good["score"] and blurred["score"] < good["score"]


def test_a_bright_studio_shot_is_not_over_exposed_but_a_clipped_one_is():
    for _, img in sample_images():  # product shots on light backgrounds
        assert image_quality.exposure(img)["score"] == 1.0
    blown = ImageEnhance.Brightness(next(iter(sample_images()))[1]).enhance(2.5)
    result = image_quality.exposure(blown)
    assert result["clipped_highlights"] > 0.3 and result["score"] < 0.7


def test_tiny_and_flat_images_do_not_break_it():
    assert image_quality.sharpness(Image.new("RGB", (2, 2)))["score"] == 0.0
    flat = image_quality.measure(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert flat["sharpness"]["score"] == 0.0 and 0.0 <= flat["score"] <= 1.0
