import pytest

from synthdistill.errors import SynthdistillError
from synthdistill.registry import (
    domain_from_classes,
    get_dataset,
    list_datasets,
    read_class_file,
    resolve_domain,
)

EXPECTED = {
    "pets": 37,
    "flowers102": 102,
    "cars": 196,
    "food101": 101,
    "dtd": 47,
    "aircraft": 100,
    "imagenet100": 100,
}
TEMPLATES = {"pets": 1, "flowers102": 1, "food101": 1, "cars": 8, "dtd": 8, "aircraft": 2, "imagenet100": 80}


def test_the_seven_paper_datasets_with_their_class_counts():
    assert list_datasets() == list(EXPECTED)
    for name, count in EXPECTED.items():
        domain = get_dataset(name)
        assert domain.num_classes == count
        assert len(set(domain.classnames)) == count
        assert len(domain.templates) == TEMPLATES[name]
        assert all("{c}" in t for t in domain.templates)
        assert domain.images_per_class == (1011 if name in ("food101", "imagenet100") else 265)
        assert domain.eval is not None and domain.sources


def test_clip_benchmark_lists_are_used_verbatim():
    pets = get_dataset("pets")
    assert pets.classnames[:2] == ("Abyssinian", "American Bulldog")
    assert pets.templates == ("a photo of a {c}, a type of pet.",)
    assert pets.superclass_of("Bengal") == "cat" and pets.superclass_of("Beagle") == "dog"
    assert get_dataset("food101").classnames[0] == "apple pie"
    assert get_dataset("cars").classnames[0] == "AM General Hummer SUV 2000"
    imagenet = get_dataset("imagenet100")
    assert list(imagenet.wnids) == sorted(imagenet.wnids)
    assert imagenet.classnames[imagenet.wnids.index("n02123045")] == "tabby cat"


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(SynthdistillError, match="Did you mean 'pets'.*Known datasets: pets"):
        get_dataset("pet")


# PAPER.md, Stage 1: the dimensions (d1..d4) per dataset, and its prompt templates
DIMENSIONS = {
    "pets": ["location", "time_of_day", "position", "camera_angle"],
    "imagenet100": ["location", "time_of_day", "position", "camera_angle"],
    "food101": ["background", "time_of_day", "serving", "camera_angle"],
    "flowers102": ["location", "time_of_day", "colour", "camera_angle"],
    "cars": ["location", "time_of_day", "colour", "camera_angle"],
    "aircraft": ["location", "time_of_day", "colour", "camera_angle"],
    "dtd": ["location", "fabric", "colour", "object"],
}
PROMPT_TEMPLATES = {
    "pets": "A photo of a {c}++++ ({s}++, pet), {d1}, {d2}, {d3}, {d4}",
    "food101": "A photo of a ({c})1.2, ({d3})1.5, Side angle, background is a {d1}, "
    "background is not blurred, ({d4})0.1, ({d2})0.1",
    "flowers102": "A photo of a {c}++ (a {s}, flower), close-up shot of the blossom, {d1}, {d4}, "
    "({d3})0.1, ({d2})0.1",
    "cars": "A photo of a {d3} {c}++++ ({s}--, car), {d1}, {d2}, {d4}",
    "aircraft": "A photo of a {d3} {c}+++ ({s}----, aircraft), {d1}+, {d4}+, {d2}",
    "dtd": "A photo of a {d3}- {c}++++ texture+++, close-up shot, {d2}--, {d4}---, {d1}----",
    "imagenet100": "{clip}++++ , {d1}, {d2}, {d3}, {d4}",
}
DOMAIN_WORDS = {
    "pets": "pet",
    "food101": "food",
    "flowers102": "flower",
    "cars": "car",
    "aircraft": "aircraft",
    "dtd": "texture",
    "imagenet100": None,
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_papers_prompt_recipe_per_dataset(name):
    domain = get_dataset(name)
    assert list(domain.contextual_dimensions) == DIMENSIONS[name]
    assert domain.prompt_template == PROMPT_TEMPLATES[name] and domain.domain_word == DOMAIN_WORDS[name]
    count = 30 if domain.images_per_class == 1011 else 15
    assert domain.options_per_dimension == count
    for dimension, options in domain.contextual_dimensions.items():
        assert len(options) == len({o.casefold() for o in options}) == count
        assert not any(c in o for o in options for c in "()+{}")  # no weighting syntax in the options
        question = domain.dimension_questions[dimension]
        assert "{c}" in question and "{domain})" in question  # names the class and the domain word
        assert ("{s}" in question) == (dimension == "serving")  # food's d3 names the LLM superclass too
    assert domain.plain_prompt == ("a photo of a {c} texture" if name == "dtd" else "a photo of a {c}")


def test_class_file(tmp_path):
    path = tmp_path / "birds.txt"
    path.write_text("# my birds\nrobin\n\nblue jay  # a corvid\nmagpie\n")
    assert read_class_file(path) == ["robin", "blue jay", "magpie"]
    domain = resolve_domain(None, path, "bird")
    assert domain.classnames == ("robin", "blue jay", "magpie")
    assert domain.superclass == "bird"
    assert domain.templates == ("a photo of a {c}, a type of bird.",)
    assert list(domain.contextual_dimensions) == ["location", "time_of_day", "position", "camera_angle"]
    assert domain.prompt_template == "A photo of a {c}++++ , {d1}, {d2}, {d3}, {d4}"
    assert domain.domain_word == "bird" and domain_from_classes(["robin"]).domain_word is None
    assert all(len(options) == 15 for options in domain.contextual_dimensions.values())


def test_class_file_duplicates_and_empty_are_refused(tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("robin\nmagpie\nRobin\n")
    with pytest.raises(SynthdistillError, match="line 3.*repeats line 1"):
        read_class_file(dup)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SynthdistillError, match="no class names"):
        read_class_file(empty)


def test_generic_domain_without_superclass():
    domain = domain_from_classes(["a", "b"])
    assert domain.superclass == "object" and domain.num_classes == 2


@pytest.mark.parametrize(
    "data, message",
    [
        (b"robin\nm\xe9sange\n", "line 2 is not valid UTF-8"),
        (b"robin\n\xff\xfe\n", "line 2 is not valid UTF-8"),
        (b"robin\nblue\x1bjay\n", "line 2 holds a control character"),
    ],
)
def test_class_file_problems_name_the_file_and_line(tmp_path, data, message):
    path = tmp_path / "birds.txt"
    path.write_bytes(data)
    with pytest.raises(SynthdistillError, match=f"Class file '{path}' {message}"):
        read_class_file(path)


def test_class_file_with_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "birds.txt"
    path.write_bytes("\ufeffrobin\r\nmésange\r\n".encode())
    assert read_class_file(path) == ["robin", "mésange"]
