"""The real test sets: torchvision's dataset classes, CLIP_benchmark's WebDataset mirrors, image folders.

Every test set becomes a :class:`TestSet`: class names, the registry's templates (CLIP_benchmark's,
for that protocol), the registry dataset it belongs to (for the paper protocol's template) and its
images. Nothing is downloaded unless asked. An image that cannot be read, and a sample of our own
shards without its label, become a marker that the loader drops and counts, so one broken file
neither stops an evaluation nor goes unseen.

Layout under ``data_root`` (what torchvision's classes read; see the README)::

    oxford-iiit-pet/  flowers-102/  stanford_cars/  food-101/  dtd/dtd/  fgvc-aircraft-2013b/
    imagenet100/val/<wnid>/ (or imagenet/val/<wnid>/)      wds_<dataset>/  (a WebDataset mirror)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, default_collate
from torchvision.datasets import ImageFolder

from synthdistill.errors import SynthdistillError, setting
from synthdistill.registry import Domain, EvalSpec, domain_from_classes, get_dataset
from synthdistill.shards import IMAGE_EXTENSIONS, ShardSamples, count_samples, decode_image, list_shards

log = logging.getLogger(__name__)

# The CLIP_benchmark / DataComp names of the registry datasets: their WebDataset mirrors are the
# Hugging Face datasets clip-benchmark/wds_<name, '/' as '-'> and djghosh/wds_<same>_test.
CLIP_BENCHMARK_NAMES = {
    "pets": "vtab/pets",
    "flowers102": "vtab/flowers",
    "cars": "cars",
    "food101": "food101",
    "dtd": "vtab/dtd",
    "aircraft": "fgvc_aircraft",
}
IMAGENET_FOLDERS = ("imagenet100/val", "imagenet/val")
# What a failed read raises: PIL's many decoder errors (OSError, SyntaxError, ValueError), a file
# named by the annotations but absent (FileNotFoundError), an image too large to be safe.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class MissingTestSet(SynthdistillError):
    """A test set whose files are not there: evaluation refuses it, validation during training skips it."""


@dataclass
class TestSet:
    """One test set ready to evaluate: either ``images`` (map-style, yielding ``(PIL image, label)``
    as torchvision's classes do) or ``shards`` (CLIP_benchmark tar shards: image + ``.cls`` label).
    ``dataset``: the registry dataset whose classes these are (None for a user's own classes)."""

    __test__ = False  # not a pytest test class

    name: str
    source: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    headline_metric: str
    num_images: int
    images: Dataset | None = None
    shards: tuple[Path, ...] = ()
    dataset: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class Batch:
    """A batch as the evaluation loop sees it: one image tensor (B, 3, H, W) per transform, labels (B,),
    and how many images of this batch could not be read (already dropped)."""

    images: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    skipped: int

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): a plain dataclass is otherwise left unpinned."""
        return Batch(tuple(x.pin_memory() for x in self.images), self.labels.pin_memory(), self.skipped)


def _expected_files(spec: EvalSpec) -> list[str]:
    """The files and folders (ending in '/') torchvision's class reads for a split, relative to root."""
    split, kwargs = spec.split, spec.kwargs
    if spec.torchvision_class == "OxfordIIITPet":
        return ["oxford-iiit-pet/images/", f"oxford-iiit-pet/annotations/{split}.txt"]
    if spec.torchvision_class == "Flowers102":
        return ["flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"]
    if spec.torchvision_class == "StanfordCars":
        annotations = "cars_test_annos_withlabels.mat" if split == "test" else "devkit/cars_train_annos.mat"
        return [
            "stanford_cars/devkit/cars_meta.mat",
            f"stanford_cars/{annotations}",
            f"stanford_cars/cars_{split}/",
        ]
    if spec.torchvision_class == "Food101":
        return [f"food-101/meta/{split}.json", "food-101/images/"]
    if spec.torchvision_class == "DTD":
        return [f"dtd/dtd/labels/{split}{kwargs.get('partition', 1)}.txt", "dtd/dtd/images/"]
    if spec.torchvision_class == "FGVCAircraft":
        level = kwargs.get("annotation_level", "variant")
        listing = {"variant": "variants", "family": "families", "manufacturer": "manufacturers"}[level]
        return [
            f"fgvc-aircraft-2013b/data/{listing}.txt",
            f"fgvc-aircraft-2013b/data/images_{level}_{split}.txt",
            "fgvc-aircraft-2013b/data/images/",
        ]
    raise SynthdistillError(f"No reader for torchvision class '{spec.torchvision_class}'.")


def _missing(root: Path, relative: Sequence[str]) -> list[str]:
    return [r for r in relative if not ((root / r).is_dir() if r.endswith("/") else (root / r).is_file())]


def mirror_folders(name: str, data_root: str | Path) -> list[Path]:
    """Where a CLIP_benchmark WebDataset mirror of a registry dataset may live under ``data_root``."""
    names = [f"wds_{name}"]
    if name in CLIP_BENCHMARK_NAMES:
        theirs = "wds_" + CLIP_BENCHMARK_NAMES[name].replace("/", "-")
        names += [theirs, f"{theirs}_test"]
    return [Path(data_root).expanduser() / n for n in dict.fromkeys(names)]


def _mirror_shards(folder: Path, split: str = "test") -> list[Path]:
    def number(path: Path) -> tuple[int, str]:
        return (int(path.stem), path.name) if path.stem.isdigit() else (-1, path.name)

    return sorted((folder / split).glob("*.tar"), key=number)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first_difference(ours: Sequence[str], theirs: Sequence[str]) -> str:
    pairs = zip(ours, theirs, strict=False)
    index = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ours), len(theirs)))
    a = ours[index] if index < len(ours) else "(none)"
    b = theirs[index] if index < len(theirs) else "(none)"
    return f"first difference at class {index}: registry '{a}', data '{b}'"


def load_mirror(
    folder: str | Path,
    name: str | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    headline_metric: str = "top1",
    dataset: str | None = None,
) -> TestSet:
    """A CLIP_benchmark WebDataset folder (``test/*.tar``, ``classnames.txt``,
    ``zeroshot_classification_templates.txt``) as a test set.

    Given ``classnames`` (a registry dataset's or a class file's), they are used and must match the
    mirror's class count; otherwise the mirror's own class names and templates are.
    """
    folder = Path(folder).expanduser()
    shards = _mirror_shards(folder)
    if not shards:
        raise SynthdistillError(
            f"'{folder}' holds no WebDataset shards: expected '{folder / 'test'}/0.tar', ..."
        )
    names_file = folder / "classnames.txt"
    mirror_names = _read_lines(names_file) if names_file.is_file() else None
    if classnames is None:
        if mirror_names is None:
            raise SynthdistillError(
                f"WebDataset mirror '{folder}' has no classnames.txt; "
                f"add one or pass a class file ({setting('classes_file', 'FILE')})."
            )
        classnames = mirror_names
    elif mirror_names is not None and len(mirror_names) != len(classnames):
        raise SynthdistillError(
            f"WebDataset mirror '{folder}' lists {len(mirror_names)} classes in classnames.txt but "
            f"{len(classnames)} are expected; point to the mirror of the right dataset."
        )
    elif mirror_names is not None and [n.casefold() for n in mirror_names] != [
        c.casefold() for c in classnames
    ]:
        log.warning(
            "WebDataset mirror '%s' names its classes differently (%s); the labels are used by position.",
            folder,
            _first_difference(list(classnames), mirror_names),
        )
    templates_file = folder / "zeroshot_classification_templates.txt"
    if templates is None:
        templates = _read_lines(templates_file) if templates_file.is_file() else None
        templates = templates or domain_from_classes(list(classnames)).templates
    return TestSet(
        name=name or folder.name,
        source=f"WebDataset mirror {folder}",
        classnames=tuple(classnames),
        templates=tuple(templates),
        headline_metric=headline_metric,
        num_images=sum(count_samples(s) for s in shards),
        shards=tuple(shards),
        dataset=dataset,
    )


class WnidImageFolder(ImageFolder):
    """torchvision's ImageFolder restricted to, and ordered by, a given list of class folders."""

    def __init__(self, root: str | Path, wnids: Sequence[str]):
        self.wnids = list(wnids)
        super().__init__(str(root))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.wnids, {w: i for i, w in enumerate(self.wnids)}


def _imagenet100(domain: Domain, root: Path) -> TestSet:
    candidates = [root / f for f in IMAGENET_FOLDERS]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise MissingTestSet(
            f"Dataset 'imagenet100' not found: expected ImageNet's validation images in class folders "
            f"'{candidates[0]}/<wnid>/' or '{candidates[1]}/<wnid>/' (torchvision ImageFolder layout)."
        )
    missing = [w for w in domain.wnids if not (folder / w).is_dir()]
    if missing:
        raise SynthdistillError(
            f"'{folder}' lacks {len(missing)} of ImageNet-100's {len(domain.wnids)} class folders "
            f"(e.g. {', '.join(missing[:3])}); it must hold a folder of validation images per wnid."
        )
    try:
        images = WnidImageFolder(folder, domain.wnids)
    except FileNotFoundError as e:
        raise SynthdistillError(f"ImageNet-100 folder '{folder}' is incomplete: {e}".rstrip()) from None
    return _registry_images(domain, images, f"torchvision ImageFolder {folder} ({len(domain.wnids)} wnids)")


def _check_classes(domain: Domain, spec: EvalSpec, root: Path, classes: Sequence[str]) -> None:
    """Registry class names must be exactly torchvision's (Food-101 with '_' as space), in order."""
    if spec.torchvision_class == "Food101":
        classes = [c.replace("_", " ") for c in classes]
    if list(classes) != list(domain.classnames):
        raise SynthdistillError(
            f"torchvision's {spec.torchvision_class} under '{root}' has {len(classes)} classes that do "
            f"not match the registry's {domain.num_classes} for '{domain.name}' "
            f"({_first_difference(list(domain.classnames), list(classes))}); the folder holds another "
            "version of the dataset."
        )


def _torchvision_test_set(domain: Domain, root: Path, download: bool) -> TestSet:
    spec = domain.eval
    expected = _expected_files(spec)
    missing = _missing(root, expected)
    if missing and not download:
        mirrors = " or ".join(f"'{m}'" for m in mirror_folders(domain.name, root)[:2])
        which = f" (missing: {', '.join(missing)})" if len(missing) < len(expected) else ""
        raise MissingTestSet(
            f"Dataset '{domain.name}' not found: torchvision's {spec.torchvision_class} expects "
            f"{', '.join(repr(f'{root}/{e}') for e in expected)}{which}; "
            f"download it with {setting('evaluate.download', 'true')}, or put CLIP_benchmark's WebDataset "
            f"mirror at {mirrors}."
        )
    if missing and spec.torchvision_class == "StanfordCars":
        raise SynthdistillError(
            "Stanford Cars can no longer be downloaded by torchvision (its link is dead); put "
            "CLIP_benchmark's WebDataset mirror (Hugging Face dataset clip-benchmark/wds_cars) at "
            f"'{mirror_folders(domain.name, root)[0]}', "
            f"or the original files under '{root / 'stanford_cars'}'."
        )
    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        images = dataset_class(str(root), split=spec.split, download=bool(missing), **spec.kwargs)
    except RuntimeError as e:
        raise SynthdistillError(
            f"torchvision's {spec.torchvision_class} refused '{root}' ({e}); check that its files are "
            f"complete and uncorrupted, or delete them and use {setting('evaluate.download', 'true')}."
        ) from None
    except OSError as e:
        if not missing:
            raise
        raise SynthdistillError(
            f"Could not download {spec.torchvision_class} into '{root}' ({e}); download it by hand "
            "(see the README for the layout)."
        ) from None
    if spec.torchvision_class in ("Food101", "DTD", "FGVCAircraft", "StanfordCars"):
        _check_classes(domain, spec, root, images.classes)
    return _registry_images(domain, images, f"torchvision {spec.torchvision_class} {spec.split} ({root})")


def _registry_images(domain: Domain, images: Dataset, source: str) -> TestSet:
    """A registry dataset's test images with its classes, templates and headline metric."""
    return TestSet(
        name=domain.name,
        source=source,
        classnames=domain.classnames,
        templates=domain.templates,
        headline_metric=domain.headline_metric,
        num_images=len(images),
        images=images,
        dataset=domain.name,
    )


def test_set_on_disk(name: str, data_root: str | Path) -> bool:
    """Whether a registry dataset's test split is under ``data_root`` (a WebDataset mirror,
    ImageNet's class folders or torchvision's files), looked up without reading it: the pipeline
    checks every input before any work starts."""
    domain = get_dataset(name)
    root = Path(data_root).expanduser()
    if domain.eval is None:
        return False
    if any(_mirror_shards(folder) for folder in mirror_folders(name, root)):
        return True
    if domain.wnids:
        return any((root / folder).is_dir() for folder in IMAGENET_FOLDERS)
    return not _missing(root, _expected_files(domain.eval))


def registry_test_set(name: str, data_root: str | Path, download: bool = False) -> TestSet:
    """A registry dataset's real test split: its WebDataset mirror ``<data_root>/wds_<name>`` when one
    is there, else torchvision's class over ``data_root`` (downloading only when ``download``).
    Raises :class:`MissingTestSet` when its files are not there."""
    domain = get_dataset(name)
    root = Path(data_root).expanduser()
    if domain.eval is None:
        raise SynthdistillError(f"Registry dataset '{name}' names no test set to evaluate on.")
    for folder in mirror_folders(name, root):
        if _mirror_shards(folder):
            return load_mirror(
                folder, domain.name, domain.classnames, domain.templates, domain.headline_metric, domain.name
            )
    if domain.wnids:
        return _imagenet100(domain, root)
    return _torchvision_test_set(domain, root, download)


def _registry_name(domain: Domain | None) -> str | None:
    """The registry dataset a domain is (a user's class list has no test split, hence no ``eval``)."""
    return domain.name if domain is not None and domain.eval is not None else None


def _folder_key(name: str) -> str:
    return name.replace("_", " ").casefold().strip()


def image_folder_test_set(path: str | Path, domain: Domain | None = None) -> TestSet:
    """An ImageFolder-style directory (``<path>/<class>/<image>``) or a WebDataset mirror folder.

    With a ``domain`` (a class file), its class names and templates are used: class folders named
    like the classes (case and '_' ignored) are matched by name, other folders are paired with the
    class names in order (sorted folders, as CLIP_benchmark does with a custom class file). Without
    one, the folder names are the class names.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SynthdistillError(f"Image folder '{path}' does not exist.")
    headline = domain.headline_metric if domain else "top1"
    dataset = _registry_name(domain)
    if list_shards(path):
        return synthetic_test_set(path, domain)
    if _mirror_shards(path):
        return load_mirror(
            path,
            classnames=domain.classnames if domain else None,
            templates=domain.templates if domain else None,
            headline_metric=headline,
            dataset=dataset,
        )
    try:
        images = ImageFolder(str(path))
    except FileNotFoundError as e:
        raise SynthdistillError(
            f"'{path}' is not an image folder ({e}); it needs one subfolder of images per class."
        ) from None
    folders = images.classes
    if domain is None:
        domain = domain_from_classes([f.replace("_", " ") for f in folders], name=path.name)
    elif len(domain.classnames) != len(folders):
        raise SynthdistillError(
            f"The class list has {domain.num_classes} names but image folder '{path}' has "
            f"{len(folders)} class folders; they must correspond one to one."
        )
    by_name = {_folder_key(c): i for i, c in enumerate(domain.classnames)}
    if {_folder_key(f) for f in folders} == set(by_name):
        relabel = [by_name[_folder_key(f)] for f in folders]
        images.samples = [(p, relabel[t]) for p, t in images.samples]
        images.targets = [t for _, t in images.samples]
    else:
        log.warning(
            "Class folders of '%s' are not named like the classes; pairing sorted folders with the class "
            "names in order ('%s' is '%s').",
            path,
            folders[0],
            domain.classnames[0],
        )
    return TestSet(
        name=path.name,
        source=f"image folder {path}",
        classnames=domain.classnames,
        templates=domain.templates,
        headline_metric=headline,
        num_images=len(images),
        images=images,
        dataset=dataset,
    )


class _SyntheticShard(Dataset):
    """One of our own generated shards as ``(PIL image or None, class_index)``. None marks a sample to
    skip and count: an unreadable image, or a sample without the ``class_index`` of its ``.json``
    (logged with the shard and key: a label cannot be guessed)."""

    def __init__(self, shard: Path):
        self.shard = shard
        try:
            self.samples = ShardSamples([shard])
        except SynthdistillError as e:  # whatever the reader refuses (unreadable, truncated, ...)
            raise SynthdistillError(
                f"Synthetic test shard '{shard}' cannot be read ({str(e).rstrip('.')}); "
                "regenerate it (`synthdistill generate` redraws a missing shard) or remove it."
            ) from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image | None, int]:
        sample = self.samples[index]
        label = sample.meta.get("class_index")
        if not isinstance(label, int) or isinstance(label, bool):
            log.warning(
                "Shard '%s' sample '%s' has no class_index in a .json; skipped.", self.shard, sample.key
            )
            return None, -1
        return decode_image(sample.image), label


def synthetic_test_set(shards_dir: str | Path, domain: Domain | None) -> TestSet:
    """A folder of synthdistill's own shards (``shard-*.tar``, class index in each ``.json``).

    Not a substitute for a real test set: it measures how closely the student follows its teacher
    on synthetic images, which is what a run without real test data (the smoke recipe) can report.
    A shard the reader refuses is named in one sentence, before any model loads.
    """
    if domain is None:
        raise SynthdistillError(
            f"Evaluating the synthetic shards in '{shards_dir}' needs their classes: --classes or --dataset."
        )
    shards = list_shards(shards_dir)
    if not shards:
        raise SynthdistillError(f"'{shards_dir}' holds no shards (shard-*.tar): generate images first.")
    images = ConcatDataset([_SyntheticShard(shard) for shard in shards])
    return TestSet(
        name=f"{domain.name} (synthetic)",
        source=f"synthetic shards {shards_dir}",
        classnames=domain.classnames,
        templates=domain.templates,
        headline_metric=domain.headline_metric,
        num_images=len(images),
        images=images,
        dataset=_registry_name(domain),
    )


def _prepare(image: Image.Image | None, label: int, transforms: Sequence[Callable]):
    if image is None:
        return None
    return tuple(t(image) for t in transforms), label


class _ReadableImages(Dataset):
    """A map-style test set whose unreadable images become ``None`` (dropped and counted by collate)."""

    def __init__(self, images: Dataset, transforms: Sequence[Callable]):
        self.images, self.transforms = images, list(transforms)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            image, label = self.images[index]
        except UNREADABLE:
            return None
        return _prepare(image, int(label), self.transforms)


class _MirrorImages(IterableDataset):
    """CLIP_benchmark tar shards read with webdataset (shards split over loader workers, in order)."""

    def __init__(self, shards: Sequence[Path], transforms: Sequence[Callable]):
        self.shards, self.transforms = [str(s) for s in shards], list(transforms)

    def _sample(self, sample: dict):
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "cls" not in sample:
            return None
        return _prepare(decode_image(sample[ext]), int(sample["cls"]), self.transforms)

    def __iter__(self):
        import webdataset as wds

        pipeline = wds.WebDataset(self.shards, shardshuffle=False, nodesplitter=lambda urls: urls)
        return map(self._sample, pipeline)


def _collate(items: list) -> Batch | None:
    kept = [item for item in items if item is not None]
    if not kept:
        return Batch((), torch.empty(0, dtype=torch.long), len(items))
    images, labels = default_collate(kept)
    return Batch(tuple(images), labels, len(items) - len(kept))


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count).round()})


def make_loader(
    test_set: TestSet,
    transforms: Sequence[Callable],
    batch_size: int,
    workers: int = 0,
    max_images: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of the test set, each image through every transform (one per model preprocessing).

    ``max_images`` keeps that many images spread evenly over a map-style test set; a mirror is
    read in order and the caller stops after ``max_images``.
    """
    if test_set.images is not None:
        dataset: Dataset = _ReadableImages(test_set.images, transforms)
        if max_images is not None:
            dataset = Subset(dataset, spread_indices(len(dataset), max_images))
    else:
        dataset = _MirrorImages(test_set.shards, transforms)
        workers = min(workers, len(test_set.shards))  # every worker reads at least one shard
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
    )
