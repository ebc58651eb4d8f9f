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
        assert len(domain.contextual_dimensions) >= 3
        assert all(len(options) >= 5 for options in domain.contextual_dimensions.values())
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


def test_class_file(tmp_path):
    path = tmp_path / "birds.txt"
    path.write_text("# my birds\nrobin\n\nblue jay  # a corvid\nmagpie\n")
    assert read_class_file(path) == ["robin", "blue jay", "magpie"]
    domain = resolve_domain(None, path, "bird")
    assert domain.classnames == ("robin", "blue jay", "magpie")
    assert domain.superclass == "bird"
    assert domain.templates == ("a photo of a {c}, a type of bird.",)
    assert domain.contextual_dimensions


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
