"""The shapes generator: reproducible, varied, and its captions and answers agree with its pixels."""
from __future__ import annotations

import re

import pytest

from mmray.data.shapes import COLOURS, NUMBER_WORDS, SHAPES, SIZES, generate_sample

SEED = 7


@pytest.fixture(scope="module")
def many():
    return [generate_sample(SEED, i) for i in range(500)]


def _same(a, b) -> bool:
    return (a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
            and a.objects == b.objects and a.qa == b.qa)


def test_same_seed_and_index_give_identical_samples():
    assert _same(generate_sample(3, 17), generate_sample(3, 17))


def test_sample_does_not_depend_on_what_was_generated_before():
    forward = [generate_sample(SEED, i) for i in range(12)]
    backward = [generate_sample(SEED, i) for i in reversed(range(12))][::-1]
    assert all(_same(a, b) for a, b in zip(forward, backward))
    assert _same(generate_sample(SEED, 11), forward[11])


def test_different_seeds_and_indices_differ():
    images_0 = [generate_sample(0, i).image.tobytes() for i in range(20)]
    images_1 = [generate_sample(1, i).image.tobytes() for i in range(20)]
    assert all(a != b for a, b in zip(images_0, images_1))
    assert len(set(images_0)) == 20


def test_image_is_rgb_of_requested_size():
    for size in (32, 64, 96):
        image = generate_sample(0, 1, image_size=size).image
        assert image.mode == "RGB" and image.size == (size, size)
    with pytest.raises(ValueError, match="image_size"):
        generate_sample(0, 1, image_size=16)


def test_one_to_three_objects_with_every_value_used(many):
    assert {len(s.objects) for s in many} == {1, 2, 3}
    assert {o["shape"] for s in many for o in s.objects} == set(SHAPES)
    assert {o["colour"] for s in many for o in s.objects} == set(COLOURS)
    assert {o["size"] for s in many for o in s.objects} == set(SIZES)
    assert len(SHAPES) >= 4 and len(COLOURS) == 6 and len(SIZES) == 2


def test_objects_are_inside_and_strictly_left_to_right(many):
    for s in many:
        for o in s.objects:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for left, right in zip(s.objects, s.objects[1:]):
            assert left["bbox"][2] <= right["bbox"][0], s.objects


def test_small_objects_are_smaller_than_large_ones(many):
    widths = {size: {o["bbox"][2] - o["bbox"][0] for s in many for o in s.objects if o["size"] == size}
              for size in SIZES}
    assert max(widths["small"]) < min(widths["large"])


def test_each_object_is_drawn_in_its_colour(many):
    """The centre pixel of every shape (all five are filled there) has the object's exact colour."""
    for s in many:
        for o in s.objects:
            x0, y0, x1, y1 = o["bbox"]
            assert s.image.getpixel(((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)) == COLOURS[o["colour"]]


def test_caption_names_every_object_in_left_to_right_order(many):
    for s in many:
        start = 0
        for o in s.objects:  # each phrase must occur after the previous one
            found = s.caption.find(f"{o['size']} {o['colour']} {o['shape']}", start)
            assert found >= 0, (s.caption, s.objects)
            start = found + 1


def test_caption_vocabulary_is_small(many):
    words = {w for s in many for w in re.findall(r"[a-z]+", s.caption)}
    assert words <= {"a", "left", "of", "and", "from", "to", "right"} | set(SHAPES) | set(COLOURS) | set(SIZES)


def _check_answer(qa: dict, objects: list[dict]) -> None:
    q, a = qa["question"], qa["answer"]
    if qa["type"] == "count":
        assert a == NUMBER_WORDS[len(objects)]
    elif qa["type"] == "colour":
        shape = re.fullmatch(r"what colour is the (\w+)\?", q).group(1)
        assert [o["colour"] for o in objects if o["shape"] == shape] == [a]
    elif qa["type"] == "shape":
        colour = re.fullmatch(r"what shape is the (\w+) object\?", q).group(1)
        assert [o["shape"] for o in objects if o["colour"] == colour] == [a]
    elif qa["type"] == "size":
        size = re.fullmatch(r"what colour is the (\w+) shape\?", q).group(1)
        assert len(objects) > 1 and [o["colour"] for o in objects if o["size"] == size] == [a]
    else:
        assert qa["type"] == "position"
        first, second = re.fullmatch(r"is the (\w+ \w+) left of the (\w+ \w+)\?", q).groups()
        names = [f"{o['colour']} {o['shape']}" for o in objects]
        assert names.count(first) == 1 and names.count(second) == 1
        assert a == ("yes" if names.index(first) < names.index(second) else "no")


def test_qa_answers_agree_with_objects(many):
    for s in many:
        assert all(set(qa) == {"question", "answer", "type"} for qa in s.qa)
        for qa in s.qa:
            _check_answer(qa, s.objects)


def test_qa_covers_every_type_and_both_yes_and_no(many):
    qa = [qa for s in many for qa in s.qa]
    assert {q["type"] for q in qa} == {"count", "colour", "shape", "position", "size"}
    # A size question wherever a size is unique in a scene of two or more, and never in a scene of one.
    for s in many:
        sizes = [o["size"] for o in s.objects]
        unique = sorted(o["colour"] for o in s.objects if len(s.objects) > 1 and sizes.count(o["size"]) == 1)
        assert sorted(q["answer"] for q in s.qa if q["type"] == "size") == unique
    assert {q["answer"] for q in qa if q["type"] == "position"} == {"yes", "no"}
    assert all(sum(q["type"] == "count" for q in s.qa) == 1 for s in many)
