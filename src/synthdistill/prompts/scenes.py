"""The ``llm`` generator (ours, not the paper's): an LLM proposes each dimension's options per
superclass, then writes one scene sentence per prompt that names the class.

An answer that does not parse (or lacks the class name) is asked again once, with a reminder and
sampled, then replaced by the registry's options or by the unweighted template prompt of the same
options; the summary counts each case. Each finished batch of answers is a unit of
:class:`~synthdistill.prompts.llm.LLMProgress`, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from synthdistill.progress import progress_bar
from synthdistill.prompts.llm import ChatModel, LLMProgress, Sampling, parse_description, parse_options
from synthdistill.prompts.records import AnswerCounts, PromptRecord
from synthdistill.prompts.templates import TokenBudget, article, subject_phrase
from synthdistill.registry import Domain
from synthdistill.runtime import derive_seed

RETRY_TEMPERATURE = 0.7
RETRY_REMINDER = "Follow the answer format exactly and nothing else."
MAX_NEW_TOKENS = 256


def _ask(
    chat: ChatModel,
    requests: list[str],
    parse: Callable[[int, str], object | None],
    sampling: Sampling,
    seed: int,
    unit: str,
    progress: LLMProgress,
    batch_size: int,
) -> list:
    """Parsed answers to ``requests``, asked in batches.

    The sampling seed of a batch depends only on ``seed`` and its start, so a batch that ``progress``
    holds from an interrupted run is taken from there and the others come out as if it never stopped.
    """
    starts = range(0, len(requests), batch_size)
    resumed = sum(
        len(requests[s : s + batch_size]) for s in starts if progress.get(f"{unit}/{s}") is not None
    )
    parsed: list = []
    with progress_bar(len(requests), f"LLM {unit}", unit="prompt", initial=resumed) as bar:
        for start in starts:
            done = progress.get(f"{unit}/{start}")
            if done is None:
                batch = requests[start : start + batch_size]
                answers = chat.complete(batch, sampling, derive_seed(seed, start))
                done = [parse(start + j, answer) for j, answer in enumerate(answers)]
                progress.add(f"{unit}/{start}", done)
                bar.update(len(batch))
            parsed += done
    return parsed


def _ask_with_retry(
    chat: ChatModel,
    requests: list[str],
    parse: Callable[[int, str], object | None],
    sampling: Sampling,
    batch_size: int,
    seed: int,
    what: str,
    progress: LLMProgress,
) -> tuple[list, AnswerCounts]:
    """Parsed answers (None where both tries failed) and their counts; a retry samples, with a reminder."""
    parsed = _ask(
        chat, requests, parse, sampling, derive_seed(seed, what), f"{what}/first", progress, batch_size
    )
    failed = [i for i, value in enumerate(parsed) if value is None]
    if failed:
        again = [f"{requests[i]}\n{RETRY_REMINDER}" for i in failed]
        retry = dataclasses.replace(sampling, temperature=max(sampling.temperature, RETRY_TEMPERATURE))
        retried = _ask(
            chat,
            again,
            lambda j, text: parse(failed[j], text),
            retry,
            derive_seed(seed, what, "retry"),
            f"{what}/retry",
            progress,
            batch_size,
        )
        for i, value in zip(failed, retried, strict=True):
            parsed[i] = value
    repaired = sum(parsed[i] is not None for i in failed)
    return parsed, AnswerCounts(len(requests) - len(failed), repaired, len(failed) - repaired)


def _options_request(superclass: str, dimension: str, examples: tuple[str, ...], count: int) -> str:
    shown = "; ".join(f"'{e}'" for e in examples[:3])
    return (
        f"List {count} different options for the {dimension.replace('_', ' ')} of a photo of "
        f"{article(superclass)} {superclass}. Each option is a short phrase of a few words that can "
        f"follow 'a photo of {article(superclass)} {superclass},' such as {shown}. "
        "Answer with a numbered list only."
    )


def _description_request(subject: str, classname: str, options: dict[str, str]) -> str:
    details = "; ".join(f"{d.replace('_', ' ')}: {o}" for d, o in options.items())
    return (
        f"Write one sentence of at most 30 words that describes {subject}, with these details: "
        f'{details}. The sentence must contain the exact words "{classname}". '
        "Answer with the sentence only."
    )


def scene_records(
    domain: Domain,
    options_per_dimension: int,
    sampling: Sampling,
    batch_size: int,
    seed: int,
    chat: ChatModel,
    budget: TokenBudget,
    progress: LLMProgress,
    build_records: Callable[[Callable[[str], dict[str, tuple[str, ...]]]], list[PromptRecord]],
) -> tuple[list[PromptRecord], AnswerCounts, AnswerCounts]:
    """Options per (superclass, dimension) from the LLM, then one LLM sentence per prompt.

    ``build_records`` turns each class's option lists into the design's records (with unweighted
    template prompts, kept where the LLM's sentence fails). An LLM list shorter than
    ``options_per_dimension`` is filled up with the registry's options, so every class has the
    design's size.
    """
    superclasses = list(dict.fromkeys(domain.superclass_of(c) for c in domain.classnames))
    keys = [(s, d) for s in superclasses for d in domain.contextual_dimensions]
    requests = [
        _options_request(s, d, domain.contextual_dimensions[d], options_per_dimension) for s, d in keys
    ]
    lists, option_counts = _ask_with_retry(
        chat,
        requests,
        lambda i, text: parse_options(text, options_per_dimension),
        sampling,
        batch_size,
        seed,
        "options",
        progress,
    )
    suggested = {}
    for (superclass, dimension), found in zip(keys, lists, strict=True):
        registry = domain.contextual_dimensions[dimension]
        found = list(found or [])
        fill = [o for o in registry if o.casefold() not in {f.casefold() for f in found}]
        suggested[superclass, dimension] = tuple((found + fill)[:options_per_dimension])

    def dimensions_of(classname: str) -> dict[str, tuple[str, ...]]:
        superclass = domain.superclass_of(classname)
        return {d: suggested[superclass, d] for d in domain.contextual_dimensions}

    records = build_records(dimensions_of)
    requests = [
        _description_request(
            subject_phrase(domain.templates, r.class_name, r.superclass), r.class_name, r.options
        )
        for r in records
    ]

    def parse(i: int, text: str) -> str | None:
        description = parse_description(text, records[i].class_name)
        classname = records[i].class_name.casefold()
        usable = description is not None and classname in budget.shorten(description).casefold()
        return description if usable else None

    descriptions, prompt_counts = _ask_with_retry(
        chat, requests, parse, sampling, batch_size, seed, "prompts", progress
    )
    for record, description in zip(records, descriptions, strict=True):
        if description is not None:
            record.prompt, record.generator = description, "llm"
    return records, option_counts, prompt_counts
