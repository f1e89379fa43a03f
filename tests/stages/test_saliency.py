"""Faces, persons and the subject map the planner avoids, on real face photographs."""

import numpy as np
import pytest
from PIL import Image

from console.samples import sample_images
from stages import saliency
from tests.stages.photos import photo


@pytest.fixture(autouse=True)
def _needs_detector():
    if saliency.face_detector_name() == "none":
        pytest.skip("no face detector installed (dlib-bin)")


def test_finds_the_portrait_face_and_the_person_under_it():
    img = photo("matplotlib/mpl-data/sample_data/grace_hopper.jpg")  # 512x600 portrait
    faces = saliency.find_faces(img)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    # Drawn by hand on the photograph: the face spans about (165, 120)-(370, 335).
    assert 150 <= x1 <= 200 and 110 <= y1 <= 160 and 340 <= x2 <= 390 and 300 <= y2 <= 350
    px1, py1, px2, py2 = faces[0].person
    assert py1 < y1 and py2 == img.height and px1 < x1 and px2 > x2


def test_finds_faces_in_a_street_scene_at_their_places():
    img = photo("ultralytics/assets/bus.jpg")
    faces = saliency.find_faces(img)
    centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in faces]
    # The two pedestrians on the left, faces by hand at (105, 400)-(160, 475) and (260, 405)-(310, 470).
    assert any(100 <= cx <= 165 and 400 <= cy <= 480 for cx, cy in centres)
    assert all(f.score >= saliency.FACE_MIN_SCORE for f in faces)


def test_a_face_pasted_into_a_flat_image_is_found_where_it_was_put():
    face = photo("matplotlib/mpl-data/sample_data/grace_hopper.jpg").crop((150, 110, 390, 350))
    img = Image.new("RGB", (800, 600), (230, 230, 225))
    img.paste(face.resize((144, 144)), (60, 300))
    faces = saliency.find_faces(img)
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 60 <= x1 < x2 <= 204 and 300 <= y1 < y2 <= 444


def test_faces_in_the_heads_of_detected_persons_are_the_whole_images_faces():
    # Person boxes drawn by hand (bench/eval_set.json), as a detector with real weights gives them.
    cases = {
        "ultralytics/assets/bus.jpg": [[50, 400, 245, 900], [222, 405, 345, 860], [668, 395, 810, 880], [0, 555, 80, 870]],
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg": [[0, 100, 512, 600]],
    }
    for relative, people in cases.items():
        img = photo(relative)
        whole, heads = saliency.find_faces(img), saliency.find_faces(img, people)
        assert len(heads) == len(whole) >= 1, relative
        for a, b in zip(sorted(whole, key=lambda f: f.box), sorted(heads, key=lambda f: f.box)):
            assert saliency._iou(a.box, b.box) > 0.6, (relative, a.box, b.box)


def test_a_detector_that_saw_no_person_means_no_face_search():
    img = photo("matplotlib/mpl-data/sample_data/grace_hopper.jpg")
    assert saliency.find_faces(img, []) == []  # trusted: the object detector found nobody
    assert saliency.find_faces(img, [[0, 0, 60, 60]]) == []  # nor in a person box far from the face


def test_head_regions_cover_the_top_of_a_body_and_a_whole_portrait():
    [(standing, up_small)] = saliency.head_regions([[100, 100, 200, 800]], (1000, 1000))
    assert standing[1] <= 100 and standing[3] < 800 and standing[0] < 100 and standing[2] > 200
    assert up_small == 1  # a face of about 100 px: one pyramid step up
    [(portrait, up_big)] = saliency.head_regions([[0, 0, 600, 700]], (600, 700))
    assert portrait == (0, 0, 600, 600) and up_big == 0


def test_no_face_in_a_product_shot():
    for _, img in sample_images():
        assert saliency.find_faces(img) == []


def test_subject_map_rates_faces_above_persons_above_objects():
    face = saliency.Face((100.0, 100.0, 140.0, 140.0), 1.0, saliency.person_from_face((100, 100, 140, 140), (400, 400)))
    product = ((300.0, 300.0, 380.0, 380.0), saliency.OBJECT_WEIGHT)
    sal = saliency.subject_map((400, 400), [face], [product])
    assert sal.shape == (400, 400) and 0.0 <= sal.min() and sal.max() <= 1.0
    assert sal[120, 120] > sal[250, 120] > sal[340, 340] > sal[20, 380]
    assert sal[20, 380] == pytest.approx(0.0, abs=1e-6)


def test_person_box_is_clipped_to_the_image():
    box = saliency.person_from_face((0, 0, 50, 60), (200, 300))
    assert box[0] == 0.0 and box[1] == 0.0 and box[2] <= 200 and box[3] == 300
    assert np.isclose(box[2], 25 + saliency.PERSON_HALF_WIDTH * 50)
