"""Stage 1: class names become diverse, domain-aware text prompts (``prompts.jsonl``).

Each prompt takes one option per contextual dimension of the domain and puts it, with the class, into
the dataset's weighted template (PAPER.md, Stage 1); that diversity is what lets a student trained on
synthetic images transfer to real ones. Generators:

- ``paper``: the authors' procedure. The LLM names a superclass per class and gives each class its
  own options per dimension (:mod:`synthdistill.prompts.paper`); the all-pairs design combines them.
- ``template``: the same design, dimensions and templates with the registry's options; no model.
- ``plain``: "a photo of a <class>" (DTD: "... texture"), ``per_class`` times: the no-diversity
  baseline of the paper's ablation.
- ``llm`` (ours): LLM options per superclass, then one LLM scene sentence per prompt
  (:mod:`synthdistill.prompts.scenes`).

``prompts.design`` picks the combinations (:mod:`synthdistill.prompts.design`). Every prompt fits the
CLIP text encoder's context (77 tokens with start and end, weighting syntax not counted); a longer
one loses whole comma-separated parts from its end (unweighted ones: words) and is counted. LLM runs
resume from a progress file beside the output. Each line of the file::

    {"class_index": 0, "class_name": "Abyssinian", "prompt": "A photo of a Abyssinian++++ (cat++, pet), ...",
     "seed": <image seed>, "options": {"location": "in a garden", ...}, "generator": "template",
     "superclass": "cat"}
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synthdistill.config import PromptsConfig
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path
from synthdistill.identity import llm_progress_identity
from synthdistill.prompts import paper, scenes
from synthdistill.prompts.design import choose_combinations, design_size
from synthdistill.prompts.llm import ChatModel, LLMProgress, Sampling, load_chat_model, progress_path
from synthdistill.prompts.records import AnswerCounts, LLMUsage, PromptRecord
from synthdistill.prompts.templates import (
    TokenBudget,
    compose_prompt,
    fill_template,
    first_part,
    subject_phrase,
)
from synthdistill.registry import Domain
from synthdistill.runtime import derive_seed, resolve_device

GENERATORS = ("paper", "template", "plain", "llm")
WEIGHTED = ("paper", "template")  # generators whose prompts use the weighted templates
PROGRESS_FORMAT = 2  # part of the progress key: bump when what a unit stores changes


@dataclass
class PromptsSummary:
    """What ``write_prompts`` wrote; ``unique_share_*`` are distinct prompts / prompts within a class.

    LLM runs add how answers fared (superclasses and option lists for ``paper``, option lists and
    sentences for ``llm``), the options the registry filled in (``paper``) and the LLM's usage.
    """

    path: str
    generator: str
    design: str
    total: int
    per_class: dict[str, int]
    unique_share_min: float
    unique_share_mean: float
    shortened: int
    llm: str | None = None
    superclass_answers: AnswerCounts | None = None
    option_answers: AnswerCounts | None = None
    prompt_answers: AnswerCounts | None = None
    fallback_options: int | None = None
    llm_usage: LLMUsage | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def warnings(self) -> list[str]:
        """What the user must not miss: an LLM whose every answer was replaced contributed nothing."""
        found = []
        for what, counts_of in (
            ("superclasses", self.superclass_answers),
            ("option lists", self.option_answers),
            ("prompts", self.prompt_answers),
        ):
            if counts_of is not None and counts_of.total and not counts_of.used + counts_of.repaired:
                found.append(
                    f"the LLM '{self.llm}' contributed no {what}: all {counts_of.total} are the registry's "
                    "fallback; check that prompts.llm is an instruction-tuned chat model"
                )
        return found

    def describe(self) -> str:
        counts = sorted(set(self.per_class.values()))
        per_class = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        design = "" if self.generator == "plain" else f", {self.design} design"
        lines = [
            f"{self.total:,} {self.generator} prompts for {len(self.per_class)} classes "
            f"({per_class} per class{design}) -> {self.path}",
            f"unique prompts per class: min {self.unique_share_min:.1%}, mean {self.unique_share_mean:.1%}",
            f"shortened to the text encoder's limit: {self.shortened}",
        ]
        for what, counts_of in (
            ("superclasses", self.superclass_answers),
            ("option lists", self.option_answers),
            ("prompts", self.prompt_answers),
        ):
            if counts_of is not None:
                lines.append(
                    f"LLM {what}: {counts_of.used} used, {counts_of.repaired} repaired on retry, "
                    f"{counts_of.replaced} replaced by the registry's"
                )
        if self.fallback_options is not None:
            lines.append(f"options filled in from the registry: {self.fallback_options}")
        if self.llm_usage is not None:
            usage = self.llm_usage
            lines.append(
                f"LLM usage: {usage.conversations:,} conversations, {usage.prompt_tokens:,} request tokens, "
                f"{usage.generated_tokens:,} generated tokens"
            )
        lines += [f"warning: {warning}" for warning in self.warnings()]
        return "\n".join(lines)


def _sampling(config: PromptsConfig) -> Sampling:
    """The config's decoding, with the generator's defaults where a key is unset."""
    is_paper = config.generator == "paper"
    defaults = paper.SAMPLING if is_paper else {"temperature": 0.0, "top_k": None, "top_p": 0.95}
    return Sampling(
        max_new_tokens=config.llm_max_new_tokens
        or (paper.OPTIONS_MAX_NEW_TOKENS if is_paper else scenes.MAX_NEW_TOKENS),
        temperature=defaults["temperature"] if config.llm_temperature is None else config.llm_temperature,
        top_k=defaults["top_k"] if config.llm_top_k is None else config.llm_top_k,
        top_p=defaults["top_p"] if config.llm_top_p is None else config.llm_top_p,
    )


def _option_counts(domain: Domain, generator: str, options_per_dimension: int) -> list[int]:
    """Options per dimension the generator combines: the registry's for ``template`` (at most the
    count asked for), the count asked for otherwise."""
    if generator == "template":
        return [min(options_per_dimension, len(o)) for o in domain.contextual_dimensions.values()]
    return [options_per_dimension] * len(domain.contextual_dimensions)


def _first_part(domain: Domain, generator: str, classname: str, whole_phrases: bool) -> str:
    """The part of a class's prompt that is never cut (for the class-name length check)."""
    if generator == "plain":
        return domain.plain_prompt.replace("{c}", classname)
    if generator == "llm":
        return subject_phrase(domain.templates, classname, domain.superclass_of(classname))
    options = [o[0] for o in domain.contextual_dimensions.values()]
    prompt = fill_template(
        domain.prompt_template,
        classname,
        domain.superclass_of(classname),
        options,
        domain.templates,
        whole_phrases=whole_phrases,
    )
    return first_part(prompt)


def _check_inputs(domain: Domain, config: PromptsConfig, options_per_dimension: int) -> None:
    """What the config's declared ranges cannot check: the domain, and per_class against the design."""
    if config.generator == "llm" and options_per_dimension < 2:
        raise SynthdistillError(
            f"'prompts.options_per_dimension' is too small ({options_per_dimension}) for the llm generator; "
            "raise it to 2 or more."
        )
    if not domain.classnames:
        raise SynthdistillError(f"Domain '{domain.name}' has no classes; name at least one class.")
    if config.generator in WEIGHTED:
        used = {int(n) for n in re.findall(r"\{d([1-9])\}", domain.prompt_template)}
        if used and max(used) > len(domain.contextual_dimensions):
            raise SynthdistillError(
                f"Domain '{domain.name}' has {len(domain.contextual_dimensions)} contextual dimensions "
                f"but its prompt template names {{d{max(used)}}}; give it a dimension per placeholder."
            )
    seen: set[str] = set()
    for classname in domain.classnames:
        if not classname.strip():
            raise SynthdistillError(f"Domain '{domain.name}' has a class name that is empty; remove it.")
        if classname.casefold() in seen:
            raise SynthdistillError(f"Class '{classname}' appears twice in '{domain.name}'; keep one.")
        seen.add(classname.casefold())
    if config.design == "allpairs" and config.per_class is not None and config.generator != "plain":
        size = design_size(tuple(_option_counts(domain, config.generator, options_per_dimension)))
        if config.per_class != size:
            raise SynthdistillError(
                f"'prompts.per_class' ({config.per_class}) differs from the all-pairs design's {size} "
                f"prompts per class ({options_per_dimension} options per dimension); drop per_class or set "
                "prompts.design=random."
            )


def _design_records(
    domain: Domain,
    generator: str,
    weighted: bool,
    whole_phrases: bool,
    design: str,
    per_class: int,
    seed: int,
    options_of: Callable[[int], dict[str, tuple[str, ...] | list[str]]],
    superclass_of: Callable[[int], str],
) -> list[PromptRecord]:
    """Each class's option combinations (the design) as records: the weighted template prompt, or the
    unweighted wording (the ``llm`` generator's fallback)."""
    records = []
    for class_index, classname in enumerate(domain.classnames):
        options, superclass = options_of(class_index), superclass_of(class_index)
        names = list(options)
        rng = random.Random(derive_seed(seed, "prompts", class_index))
        combinations = choose_combinations(design, [len(options[n]) for n in names], per_class, rng)
        for prompt_index, combination in enumerate(combinations):
            chosen = {n: options[n][i] for n, i in zip(names, combination, strict=True)}
            if weighted:
                clip_rng = random.Random(derive_seed(seed, "clip template", class_index, prompt_index))
                prompt = fill_template(
                    domain.prompt_template,
                    classname,
                    superclass,
                    list(chosen.values()),
                    domain.templates,
                    clip_rng,
                    whole_phrases,
                )
            else:
                prompt = compose_prompt(subject_phrase(domain.templates, classname, superclass), chosen)
            records.append(
                PromptRecord(
                    class_index=class_index,
                    class_name=classname,
                    prompt=prompt,
                    seed=derive_seed(seed, "image", class_index, prompt_index),
                    options=chosen,
                    generator=generator,
                    superclass=superclass,
                )
            )
    return records


def _plain_records(domain: Domain, per_class: int, seed: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            class_index=class_index,
            class_name=classname,
            prompt=domain.plain_prompt.replace("{c}", classname),
            seed=derive_seed(seed, "image", class_index, prompt_index),
            options={},
            generator="plain",
            superclass=domain.superclass_of(classname),
        )
        for class_index, classname in enumerate(domain.classnames)
        for prompt_index in range(per_class)
    ]


def write_prompts(
    domain: Domain,
    config: PromptsConfig,
    out_path: Path,
    seed: int = 0,
    device: str = "auto",
    chat_model: ChatModel | None = None,
) -> PromptsSummary:
    """Write the prompts for every class of ``domain`` to ``out_path`` (JSON Lines, atomically).

    Per class: the all-pairs design's size, or ``config.per_class`` (default: the dataset's images
    per class) with ``design=random`` and for ``plain``. ``chat_model`` replaces the LLM named by
    ``config.llm``; the generators without an LLM ignore it and ``device``. Bad input is refused
    before any model loads or anything is written. The LLM generators resume from
    :func:`progress_path` when an earlier call under the same settings was interrupted, and delete
    that file once ``out_path`` is written.
    """
    out_path = Path(out_path)
    per_class = config.per_class if config.per_class is not None else domain.images_per_class
    options_per_dimension = config.options_per_dimension or domain.options_per_dimension
    _check_inputs(domain, config, options_per_dimension)
    budget = TokenBudget(config.max_prompt_tokens)
    for classname in domain.classnames:
        if not budget.fits(_first_part(domain, config.generator, classname, config.weight_whole_phrases)):
            raise SynthdistillError(
                f"Class name '{classname}' is too long for a {config.max_prompt_tokens}-token prompt; "
                "shorten it in the class file."
            )
    summary_extra: dict = {}
    classnames, generator, design = domain.classnames, config.generator, config.design

    def registry_superclass(class_index: int) -> str:
        return domain.superclass_of(classnames[class_index])

    def design_records(options_of, superclass_of) -> list:
        """The all-pairs design's prompts, with each class's options and superclass from these."""
        return _design_records(
            domain,
            generator,
            True,
            config.weight_whole_phrases,
            design,
            per_class,
            seed,
            options_of,
            superclass_of,
        )

    if generator == "plain":
        records = _plain_records(domain, per_class, seed)
    elif generator == "template":
        registry_options = {d: o[:options_per_dimension] for d, o in domain.contextual_dimensions.items()}
        records = design_records(lambda _: registry_options, registry_superclass)
    else:
        chat = chat_model or load_chat_model(config.llm, device, config.llm_batch_size)
        key = llm_progress_identity(domain, config, seed, resolve_device(device).type, PROGRESS_FORMAT)
        progress = LLMProgress(progress_path(out_path), key)
        sampling = _sampling(config)
        summary_extra["llm"] = config.llm
        if generator == "paper":
            found = paper.ask_paper_options(
                domain, chat, options_per_dimension, sampling, config.llm_retries, seed, progress
            )
            records = design_records(lambda i: found.options[i], lambda i: found.superclasses[i])
            summary_extra.update(
                superclass_answers=found.superclass_answers if domain.domain_word else None,
                option_answers=found.option_answers,
                fallback_options=found.fallback_options,
                llm_usage=found.usage,
            )
        else:

            def build(dimensions_of: Callable[[str], dict[str, tuple[str, ...]]]) -> list[PromptRecord]:
                return _design_records(
                    domain,
                    "template",
                    False,
                    False,
                    design,
                    per_class,
                    seed,
                    lambda i: dimensions_of(classnames[i]),
                    registry_superclass,
                )

            records, option_counts, prompt_counts = scenes.scene_records(
                domain,
                options_per_dimension,
                sampling,
                config.llm_batch_size,
                seed,
                chat,
                budget,
                progress,
                build,
            )
            summary_extra.update(option_answers=option_counts, prompt_answers=prompt_counts)
    shortened, weighted = 0, generator in WEIGHTED
    for record in records:
        fitted = budget.fit_weighted(record.prompt) if weighted else budget.shorten(record.prompt)
        shortened += fitted != record.prompt
        record.prompt = fitted
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
    if generator in ("paper", "llm"):
        progress_path(out_path).unlink(missing_ok=True)
    by_class: dict[str, list[str]] = {c: [] for c in domain.classnames}
    for record in records:
        by_class[record.class_name].append(record.prompt)
    shares = [len(set(p)) / len(p) for p in by_class.values()]
    return PromptsSummary(
        path=str(out_path),
        generator=generator,
        design=design,
        total=len(records),
        per_class={c: len(p) for c, p in by_class.items()},
        unique_share_min=min(shares),
        unique_share_mean=sum(shares) / len(shares),
        shortened=shortened,
        **summary_extra,
    )
