"""The dataset registry: class names, zero-shot templates and contextual dimensions per domain.

Each registry dataset is a JSON file in ``registry/data/`` (sources named inside). A user's own
class list becomes the same kind of :class:`Domain`, with generic contextual dimensions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from synthdistill.errors import SynthdistillError


@dataclass(frozen=True)
class EvalSpec:
    """How evaluation reads the real test set: a torchvision dataset class and split."""

    torchvision_class: str
    split: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Domain:
    """Everything the pipeline needs to know about a set of classes."""

    name: str
    title: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    superclass: str
    contextual_dimensions: dict[str, tuple[str, ...]]
    images_per_class: int
    headline_metric: str = "top1"
    eval: EvalSpec | None = None
    class_superclasses: dict[str, str] = field(default_factory=dict)
    wnids: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def superclass_of(self, classname: str) -> str:
        """The superclass word for one class (pets: 'cat' or 'dog' by breed), else the domain's."""
        return self.class_superclasses.get(classname, self.superclass)


def _data_dir():
    return resources.files("synthdistill.registry") / "data"


def _domain_from_json(data: dict) -> Domain:
    spec = data.get("eval")
    return Domain(
        name=data["name"],
        title=data.get("title", data["name"]),
        classnames=tuple(data["classnames"]),
        templates=tuple(data["templates"]),
        superclass=data["superclass"],
        contextual_dimensions={k: tuple(v) for k, v in data["contextual_dimensions"].items()},
        images_per_class=int(data["images_per_class"]),
        headline_metric=data.get("headline_metric", "top1"),
        eval=EvalSpec(**spec) if spec else None,
        class_superclasses=dict(data.get("class_superclasses", {})),
        wnids=tuple(data.get("wnids", ())),
        sources=dict(data.get("sources", {})),
    )


@cache
def _load(name: str) -> dict:
    return json.loads((_data_dir() / f"{name}.json").read_text(encoding="utf-8"))


def list_datasets() -> list[str]:
    """Names of the registry datasets, in the paper's order."""
    order = ["pets", "flowers102", "cars", "food101", "dtd", "aircraft", "imagenet100"]
    present = {p.name[: -len(".json")] for p in _data_dir().iterdir() if p.name.endswith(".json")}
    return [n for n in order if n in present] + sorted(present - set(order) - {"generic"})


def get_dataset(name: str) -> Domain:
    """A registry dataset by name; an unknown name is refused with the known ones listed."""
    known = list_datasets()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise SynthdistillError(f"Unknown dataset '{name}'.{hint} Known datasets: {', '.join(known)}.")
    return _domain_from_json(_load(name))


def read_class_file(path: str | Path) -> list[str]:
    """One class per line; blank lines and '#' comments ignored; duplicates refused with the line named."""
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(f"Class file '{path}' does not exist.")
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if name.casefold() in first_line:
            raise SynthdistillError(
                f"Class file '{path}' line {number}: '{name}' repeats line {first_line[name.casefold()]}."
            )
        first_line[name.casefold()] = number
        names.append(name)
    if not names:
        raise SynthdistillError(f"Class file '{path}' holds no class names (one per line, '#' for comments).")
    return names


def domain_from_classes(classnames: list[str], superclass: str | None = None, name: str = "custom") -> Domain:
    """A user domain: the given classes with generic contextual dimensions and templates."""
    generic = _load("generic")
    templates = [f"a photo of a {{c}}, a type of {superclass}."] if superclass else generic["templates"]
    superclass = superclass or generic["superclass"]
    return Domain(
        name=name,
        title=f"{name} ({len(classnames)} classes)",
        classnames=tuple(classnames),
        templates=tuple(templates),
        superclass=superclass,
        contextual_dimensions={k: tuple(v) for k, v in generic["contextual_dimensions"].items()},
        images_per_class=int(generic["images_per_class"]),
        sources={"classnames": "user class file", **generic.get("sources", {})},
    )


def resolve_domain(dataset: str | None, classes_file: str | Path | None, superclass: str | None) -> Domain:
    """The domain a recipe or command line names: a class file wins over a registry dataset."""
    if classes_file:
        return domain_from_classes(read_class_file(classes_file), superclass, name=Path(classes_file).stem)
    if dataset is None:
        raise SynthdistillError("Name a registry dataset (--dataset) or a class file (--classes).")
    domain = get_dataset(dataset)
    if superclass:
        domain = dataclasses.replace(domain, superclass=superclass, class_superclasses={})
    return domain
