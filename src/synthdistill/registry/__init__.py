"""The dataset registry: class names, zero-shot templates and the prompt recipe per domain.

Each registry dataset is a JSON file in ``registry/data/`` (sources named inside). Besides class
names and zero-shot templates it holds PAPER.md's stage-1 recipe: the domain word, the four
contextual dimensions in order (each with its LLM question and fallback options) and the weighted
prompt template. A user's own class list becomes the same kind of :class:`Domain`, with the paper's
"other" dimensions and template (``generic.json``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from synthdistill.errors import SynthdistillError, setting


@dataclass(frozen=True)
class EvalSpec:
    """How evaluation reads the real test set: a torchvision dataset class and split."""

    torchvision_class: str
    split: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Domain:
    """Everything the pipeline needs to know about a set of classes.

    ``contextual_dimensions`` maps each dimension (in the template's order d1, d2, ...) to its
    fallback options; ``dimension_questions`` to its LLM question, with ``{c}`` (class), ``{s}``
    (LLM superclass) and ``{domain}`` (domain word) placeholders. ``prompt_template`` is in Compel
    syntax with ``{c}``, ``{s}``, ``{d1}``...``{d4}`` and ``{clip}`` (one of ``templates`` at random,
    filled with the class). ``options_per_dimension`` is the paper's count (15, or 30 where the
    dataset has 1011 images per class).
    """

    name: str
    title: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    superclass: str
    contextual_dimensions: dict[str, tuple[str, ...]]
    images_per_class: int
    domain_word: str | None = None
    prompt_template: str = "A photo of a {c}++++ , {d1}, {d2}, {d3}, {d4}"
    plain_prompt: str = "a photo of a {c}"
    options_per_dimension: int = 15
    dimension_questions: dict[str, str] = field(default_factory=dict)
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


def _prompt_recipe(data: dict) -> dict:
    """The stage-1 fields of a registry JSON entry, as :class:`Domain` keyword arguments."""
    recipe = {
        "contextual_dimensions": {d["name"]: tuple(d["options"]) for d in data["dimensions"]},
        "dimension_questions": {d["name"]: d["question"] for d in data["dimensions"]},
        "domain_word": data.get("domain_word"),
        "prompt_template": data["prompt_template"],
        "options_per_dimension": int(data["options_per_dimension"]),
    }
    if "plain_prompt" in data:
        recipe["plain_prompt"] = data["plain_prompt"]
    return recipe


def _domain_from_json(data: dict) -> Domain:
    spec = data.get("eval")
    return Domain(
        name=data["name"],
        title=data.get("title", data["name"]),
        classnames=tuple(data["classnames"]),
        templates=tuple(data["templates"]),
        superclass=data["superclass"],
        images_per_class=int(data["images_per_class"]),
        **_prompt_recipe(data),
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
    """One class per line; blank lines and '#' comments ignored.

    Refused in one sentence naming the file and line: bytes that are not UTF-8, control characters,
    a duplicate (case-insensitive). A UTF-8 byte-order mark is allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(f"Class file '{path}' does not exist.")
    names: list[str] = []
    first_line: dict[str, int] = {}
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, raw_bytes in enumerate(data.splitlines(), start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise SynthdistillError(
                f"Class file '{path}' line {number} is not valid UTF-8; save the file as UTF-8."
            ) from None
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if not name.isprintable():
            raise SynthdistillError(
                f"Class file '{path}' line {number} holds a control character; remove it."
            )
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
    """A user domain: the given classes with PAPER.md's "other" dimensions and prompt template.

    ``superclass`` (e.g. 'bird') is also the domain word the LLM questions name.
    """
    generic = _load("generic")
    templates = [f"a photo of a {{c}}, a type of {superclass}."] if superclass else generic["templates"]
    return Domain(
        name=name,
        title=f"{name} ({len(classnames)} classes)",
        classnames=tuple(classnames),
        templates=tuple(templates),
        superclass=superclass or generic["superclass"],
        images_per_class=int(generic["images_per_class"]),
        sources={"classnames": "user class file", **generic.get("sources", {})},
        **{**_prompt_recipe(generic), "domain_word": superclass},
    )


def resolve_domain(dataset: str | None, classes_file: str | Path | None, superclass: str | None) -> Domain:
    """The domain a recipe or command line names: a class file wins over a registry dataset."""
    if classes_file:
        return domain_from_classes(read_class_file(classes_file), superclass, name=Path(classes_file).stem)
    if dataset is None:
        raise SynthdistillError(
            f"Name a registry dataset ({setting('dataset', 'NAME')}) or a class file "
            f"({setting('classes_file', 'FILE')})."
        )
    domain = get_dataset(dataset)
    if superclass:
        domain = dataclasses.replace(domain, superclass=superclass, class_superclasses={})
    return domain
