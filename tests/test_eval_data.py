"""Real test sets: fake files in the layout each torchvision class reads, so the real loaders run."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.transforms as T

from conftest import random_image
from synthdistill.errors import SynthdistillError
from synthdistill.evaluate.test_sets import (
    image_folder_test_set,
    make_loader,
    registry_test_set,
    spread_indices,
)
from synthdistill.registry import domain_from_classes, get_dataset

SMALL = 16  # fake images are tiny: only the loaders are under test here


def save_image(path: Path, seed: int, size: int = SMALL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, size).save(path, format="JPEG")


def write_pets(root: Path, labels: list[int]) -> None:
    """oxford-iiit-pet/annotations/test.txt ('<image id> <class 1..37> <species> <breed>') + images/."""
    base, names = root / "oxford-iiit-pet", get_dataset("pets").classnames
    lines = []
    for i, label in enumerate(labels):
        image_id = f"{names[label].replace(' ', '_')}_{100 + i}"
        save_image(base / "images" / f"{image_id}.jpg", i)
        lines.append(f"{image_id} {label + 1} 1 1")
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")


def write_flowers(root: Path, labels: list[int]) -> None:
    """flowers-102/imagelabels.mat (1-based label per image id), setid.mat (tstid), jpg/image_%05d.jpg."""
    base = root / "flowers-102"
    image_ids = list(range(1, len(labels) + 1))
    for image_id in image_ids:
        save_image(base / "jpg" / f"image_{image_id:05d}.jpg", image_id)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([[label + 1 for label in labels]])})
    scipy.io.savemat(
        base / "setid.mat",
        {
            "trnid": np.array([[9001, 9002]]),
            "valid": np.array([[9003, 9004]]),
            "tstid": np.array([image_ids]),
        },
    )


def write_cars(root: Path, labels: list[int]) -> None:
    """stanford_cars/devkit/cars_meta.mat (class_names), cars_test_annos_withlabels.mat, cars_test/."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.array(list(get_dataset("cars").classnames), dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    annotations = np.zeros(len(labels), dtype=[("fname", object), ("class", object)])
    for i, label in enumerate(labels):
        fname = f"{i + 1:05d}.jpg"
        save_image(base / "cars_test" / fname, i)
        annotations[i] = (fname, label + 1)
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations[None, :]})


def write_food(root: Path, labels: list[int]) -> None:
    """food-101/meta/test.json ({class: ['class/id', ...]} for all 101 classes) + classes.txt + images/."""
    base, names = root / "food-101", [c.replace(" ", "_") for c in get_dataset("food101").classnames]
    test = {name: [] for name in names}
    for i, label in enumerate(labels):
        test[names[label]].append(f"{names[label]}/{1000 + i}")
        save_image(base / "images" / names[label] / f"{1000 + i}.jpg", i)
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "classes.txt").write_text("\n".join(names) + "\n")


def write_dtd(root: Path, labels: list[int]) -> list[int]:
    """dtd/dtd/labels/test1.txt ('<class>/<file>') + images/<class>/. torchvision takes its classes from
    the split file, so every class gets an image; returns the labels of all images in file order."""
    base, names = root / "dtd" / "dtd", get_dataset("dtd").classnames
    all_labels = sorted(labels + list(range(len(names))))
    lines = []
    for i, label in enumerate(all_labels):
        relative = f"{names[label]}/{names[label]}_{i:04d}.jpg"
        save_image(base / "images" / relative, i, size=8)
        lines.append(relative)
    (base / "labels").mkdir(parents=True, exist_ok=True)
    (base / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")
    return all_labels


def write_aircraft(root: Path, labels: list[int]) -> None:
    """fgvc-aircraft-2013b/data/variants.txt, images_variant_test.txt ('<image> <variant>'), images/."""
    base, names = root / "fgvc-aircraft-2013b" / "data", get_dataset("aircraft").classnames
    lines = []
    for i, label in enumerate(labels):
        save_image(base / "images" / f"{1000000 + i}.jpg", i)
        lines.append(f"{1000000 + i} {names[label]}")
    (base / "variants.txt").write_text("\n".join(names) + "\n")
    (base / "images_variant_test.txt").write_text("\n".join(lines) + "\n")


def write_imagenet100(root: Path, labels: list[int]) -> list[int]:
    """imagenet/val/<wnid>/*.JPEG: one image per ImageNet-100 class (ImageFolder needs every class),
    plus ``labels`` extra ones and a class outside the subset that must be ignored."""
    base, wnids = root / "imagenet" / "val", get_dataset("imagenet100").wnids
    all_labels = sorted(labels + list(range(len(wnids))))
    for i, label in enumerate(all_labels):
        save_image(base / wnids[label] / f"ILSVRC2012_val_{i:08d}.JPEG", i, size=8)
    save_image(base / "n15075141" / "ILSVRC2012_val_99999999.JPEG", 0, size=8)
    return all_labels


WRITERS = {
    "pets": write_pets,
    "flowers102": write_flowers,
    "cars": write_cars,
    "food101": write_food,
    "dtd": write_dtd,
    "aircraft": write_aircraft,
    "imagenet100": write_imagenet100,
}


def fake_md5_free_flowers(monkeypatch) -> None:
    """Flowers102 checks the md5 of the real .mat files, which fake files cannot match: check presence."""
    import torchvision.datasets.flowers102 as flowers102

    monkeypatch.setattr(flowers102, "check_integrity", lambda path, md5=None: Path(path).is_file())


def read_labels(test_set, **kwargs) -> tuple[list[int], int]:
    """Every label the loader yields (in order) and how many images it skipped."""
    transform = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor()])
    labels, skipped = [], 0
    for batch in make_loader(test_set, [transform], batch_size=4, **kwargs):
        labels += batch.labels.tolist()
        skipped += batch.skipped
        assert all(x.shape == (len(batch), 3, 8, 8) for x in batch.images)
    return labels, skipped


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_registry_dataset_reads_through_torchvision(tmp_path, monkeypatch, name):
    fake_md5_free_flowers(monkeypatch)
    domain = get_dataset(name)
    labels = [0, 3, domain.num_classes - 1, 3]
    written = WRITERS[name](tmp_path, labels) or labels
    test_set = registry_test_set(name, tmp_path)
    assert test_set.classnames == domain.classnames
    assert test_set.templates == domain.templates
    assert test_set.num_images == len(written)
    read, skipped = read_labels(test_set)
    assert skipped == 0
    assert sorted(read) == sorted(written)
    if name not in ("dtd", "imagenet100", "food101"):  # those list images in class order
        assert read == written


def test_missing_dataset_names_the_files_torchvision_expects(tmp_path):
    with pytest.raises(SynthdistillError) as error:
        registry_test_set("aircraft", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "fgvc-aircraft-2013b/data/images_variant_test.txt") in message
    assert "evaluate.download=true" in message and "wds_aircraft" in message
    write_pets(tmp_path, [0])
    (tmp_path / "oxford-iiit-pet" / "annotations" / "test.txt").unlink()
    with pytest.raises(SynthdistillError, match=r"missing: oxford-iiit-pet/annotations/test.txt\)"):
        registry_test_set("pets", tmp_path)


def test_stanford_cars_download_points_to_the_mirror(tmp_path):
    with pytest.raises(SynthdistillError, match="clip-benchmark/wds_cars"):
        registry_test_set("cars", tmp_path, download=True)


def test_class_names_that_differ_from_the_registry_are_refused(tmp_path):
    write_aircraft(tmp_path, [0, 1])
    variants = tmp_path / "fgvc-aircraft-2013b" / "data" / "variants.txt"
    names = variants.read_text().splitlines()
    names[1], names[2] = names[2], names[1]
    variants.write_text("\n".join(names) + "\n")
    with pytest.raises(
        SynthdistillError, match="first difference at class 1: registry '727-200', data '737-200'"
    ):
        registry_test_set("aircraft", tmp_path)


def test_imagenet100_names_missing_class_folders(tmp_path):
    write_imagenet100(tmp_path, [])
    wnid = get_dataset("imagenet100").wnids[7]
    for path in (tmp_path / "imagenet" / "val" / wnid).iterdir():
        path.unlink()
    (tmp_path / "imagenet" / "val" / wnid).rmdir()
    with pytest.raises(
        SynthdistillError, match=f"lacks 1 of ImageNet-100's 100 class folders \\(e.g. {wnid}\\)"
    ):
        registry_test_set("imagenet100", tmp_path)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    write_pets(tmp_path, [0, 1, 2, 3, 4])
    images = sorted((tmp_path / "oxford-iiit-pet" / "images").iterdir())
    images[1].write_bytes(b"not an image")
    images[3].unlink()  # listed in the annotations, absent on disk
    read, skipped = read_labels(registry_test_set("pets", tmp_path))
    assert skipped == 2
    assert read == [0, 2, 4]


def write_mirror(folder: Path, labels: list[int], classes: list[str], templates: list[str]) -> None:
    """A WebDataset mirror written by CLIP_benchmark's own converter (test/0.tar, classnames.txt, ...)."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    class Listing(list):
        pass

    dataset = Listing((random_image(i, SMALL), label) for i, label in enumerate(labels))
    dataset.classes, dataset.templates = classes, templates
    convert_dataset(dataset, "test", str(folder), transform=PIL_to_bytes("webp"), max_count=3, verbose=False)


def test_webdataset_mirror_is_read_as_clip_benchmark_reads_it(tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    classes, templates = ["red fox", "grey wolf", "house cat"], ["a photo of a {c}.", "a {c} in the wild."]
    labels = [2, 0, 1, 1, 2, 0, 2]
    write_mirror(tmp_path / "animals", labels, classes, templates)
    assert len(list((tmp_path / "animals" / "test").glob("*.tar"))) == 3

    test_set = image_folder_test_set(tmp_path / "animals")
    assert test_set.classnames == tuple(classes) and test_set.templates == tuple(templates)
    assert test_set.num_images == len(labels)
    read, skipped = read_labels(test_set)
    assert sorted(read_labels(test_set, workers=2)[0]) == sorted(labels)
    theirs = build_wds_dataset("animals", transform=None, data_dir=str(tmp_path / "animals"))
    assert read == [label for _, label in theirs] == labels
    assert skipped == 0
    assert theirs.classes == classes and theirs.templates == templates


def test_registry_mirror_takes_precedence_and_keeps_registry_names(tmp_path):
    pets = get_dataset("pets")
    write_mirror(tmp_path / "wds_vtab-pets", [5, 36], [c.lower() for c in pets.classnames], ["{c}"])
    test_set = registry_test_set("pets", tmp_path)
    assert test_set.source.startswith("WebDataset mirror")
    assert test_set.classnames == pets.classnames and test_set.templates == pets.templates
    assert read_labels(test_set)[0] == [5, 36]
    write_mirror(tmp_path / "wds_dtd", [0], ["one", "two"], ["{c}"])
    with pytest.raises(SynthdistillError, match="lists 2 classes in classnames.txt but 47 are expected"):
        registry_test_set("dtd", tmp_path)


def write_folder(root: Path, layout: dict[str, int]) -> None:
    for folder, count in layout.items():
        for i in range(count):
            save_image(root / folder / f"{i}.png", i)


def test_image_folder_classes_from_folder_names(tmp_path):
    write_folder(tmp_path / "test", {"red_fox": 2, "grey_wolf": 1})
    test_set = image_folder_test_set(tmp_path / "test")
    assert test_set.classnames == ("grey wolf", "red fox")
    assert read_labels(test_set)[0] == [0, 1, 1]


def test_image_folder_matches_class_file_by_name_else_by_order(tmp_path):
    write_folder(tmp_path / "named", {"Red_Fox": 2, "grey wolf": 1})
    domain = domain_from_classes(["red fox", "grey wolf"])
    test_set = image_folder_test_set(tmp_path / "named", domain)
    assert test_set.classnames == ("red fox", "grey wolf")
    assert read_labels(test_set)[0] == [0, 0, 1]  # 'Red_Fox' is class 0 of the file, though sorted second

    write_folder(tmp_path / "numbered", {"001": 1, "002": 2})
    assert read_labels(image_folder_test_set(tmp_path / "numbered", domain))[0] == [0, 1, 1]


def test_class_file_length_must_match_the_folders(tmp_path):
    write_folder(tmp_path / "test", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(
        SynthdistillError, match="class list has 2 names but image folder .* has 3 class folders"
    ):
        image_folder_test_set(tmp_path / "test", domain_from_classes(["a", "b"]))


def test_max_images_spreads_over_a_map_style_test_set(tmp_path):
    assert spread_indices(10, 3) == [0, 4, 9]
    assert spread_indices(3, 10) == [0, 1, 2]
    write_pets(tmp_path, [0, 0, 1, 1, 2, 2])
    assert read_labels(registry_test_set("pets", tmp_path), max_images=3)[0] == [0, 1, 2]


def test_loader_batches_carry_one_tensor_per_transform(tmp_path):
    write_pets(tmp_path, [0, 1, 2])
    transforms = [T.Compose([T.Resize(s), T.CenterCrop(s), T.ToTensor()]) for s in (8, 12)]
    batch = next(iter(make_loader(registry_test_set("pets", tmp_path), transforms, batch_size=3)))
    assert [tuple(x.shape) for x in batch.images] == [(3, 3, 8, 8), (3, 3, 12, 12)]
    assert torch.equal(batch.labels, torch.tensor([0, 1, 2]))


def test_a_runs_own_shards_are_a_synthetic_test_set_with_unreadable_images_counted(tmp_path):
    from synthdistill.evaluate.test_sets import image_folder_test_set, make_loader
    from synthdistill.shards import ShardWriter, encode_sample, shard_name

    domain = domain_from_classes(["robin", "owl"], "bird")
    with ShardWriter(tmp_path / shard_name(0)) as writer:
        for i in range(4):
            writer.write(f"{i:08d}", encode_sample(random_image(i), {"class_index": i % 2}))
        writer.write("00000004", {"jpg": b"not an image", "json": b'{"class_index": 1}'})
    test_set = image_folder_test_set(tmp_path, domain)
    assert test_set.num_images == 5 and test_set.classnames == ("robin", "owl")
    assert "synthetic" in test_set.name
    batches = list(make_loader(test_set, [T.Compose([T.Resize((8, 8)), T.ToTensor()])], batch_size=8))
    assert batches[0].labels.tolist() == [0, 1, 0, 1] and batches[0].skipped == 1
    with pytest.raises(SynthdistillError, match="needs their classes"):
        image_folder_test_set(tmp_path, None)


def test_a_shard_sample_without_its_label_is_skipped_counted_and_named(tmp_path, caplog):
    from synthdistill.shards import ShardWriter, encode_sample, shard_name

    with ShardWriter(tmp_path / shard_name(0)) as writer:
        writer.write("00000000", encode_sample(random_image(0), {"class_index": 1}))
        writer.write("00000001", {"jpg": encode_sample(random_image(1), {})["jpg"]})  # no .json
        writer.write("00000002", encode_sample(random_image(2), {"prompt": "no class_index"}))
        writer.write("00000003", encode_sample(random_image(3), {"class_index": 0}))
    test_set = image_folder_test_set(tmp_path, domain_from_classes(["robin", "owl"], "bird"))
    with caplog.at_level("WARNING"):
        assert read_labels(test_set) == ([1, 0], 2)
    named = [r.getMessage() for r in caplog.records if "has no class_index" in r.getMessage()]
    assert len(named) == 2
    for key, message in zip(("00000001", "00000002"), named, strict=True):
        assert f"Shard '{tmp_path / shard_name(0)}' sample '{key}' has no class_index" in message


def test_a_shard_the_reader_refuses_is_named_in_one_sentence(tmp_path):
    from synthdistill.shards import ShardWriter, encode_sample, shard_name

    with ShardWriter(tmp_path / shard_name(0)) as writer:
        writer.write("00000000", encode_sample(random_image(0), {"class_index": 0}))
    (tmp_path / shard_name(1)).write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(SynthdistillError) as error:
        image_folder_test_set(tmp_path, domain_from_classes(["robin", "owl"]))
    message = str(error.value)
    assert message.startswith(f"Synthetic test shard '{tmp_path / shard_name(1)}' cannot be read (")
    assert message.count(". ") == 0 and message.endswith(".")
