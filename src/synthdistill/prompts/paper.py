"""The ``paper`` generator's LLM questions (PAPER.md, Stage 1): a superclass per class, then per class
and dimension rounds of option lists.

Every round asks all classes' questions in one :meth:`ChatModel.complete` call (Pets: 37 superclass
questions, then 3 rounds of 37 x 4 option questions). An answer that does not give what was asked
for is asked again, at most ``retries`` times, each retry one more call with only the failed
questions; then the registry's word or options fill in and are counted. Each finished call is a
unit of :class:`~synthdistill.prompts.llm.LLMProgress`, so an interrupted run resumes by round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from synthdistill.prompts.llm import ChatModel, LLMProgress, Sampling, parse_options, parse_superclass
from synthdistill.prompts.records import AnswerCounts, LLMUsage
from synthdistill.prompts.templates import plain_phrase
from synthdistill.registry import Domain
from synthdistill.runtime import derive_seed

OPTIONS_PER_ANSWER = 5  # of the 6 bullet points asked for, the first 5 are kept
BULLETS_ASKED = 6
SUPERCLASS_MAX_NEW_TOKENS = 32
OPTIONS_MAX_NEW_TOKENS = 128
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}  # the authors' decoding


@dataclass
class PaperOptions:
    """Per class: the superclass and each dimension's options; with the counts of how answers fared."""

    superclasses: list[str]
    options: list[dict[str, list[str]]]
    superclass_answers: AnswerCounts = field(default_factory=AnswerCounts)
    option_answers: AnswerCounts = field(default_factory=AnswerCounts)
    fallback_options: int = 0
    usage: LLMUsage = field(default_factory=LLMUsage)


def _fill(question: str, classname: str, domain_word: str | None, superclass: str) -> str:
    if domain_word is None:
        question = question.replace(" ({domain})", "").replace(", {domain})", ")")
    return (
        question.replace("{c}", classname).replace("{s}", superclass).replace("{domain}", domain_word or "")
    )


def superclass_request(domain_word: str, classname: str) -> str:
    return f"What kind of {domain_word} is a {classname}? Answer with one noun only"


def options_request(question: str, classname: str, domain_word: str | None, superclass: str) -> str:
    return (
        f"{_fill(question, classname, domain_word, superclass)} Answer with {BULLETS_ASKED} numbered "
        "bullet points, no sentences, no explanations."
    )


def parse_option_list(text: str) -> list[str] | None:
    """The first 5 options of a list answer, cleaned of weighting syntax; None when it gives fewer."""
    found = parse_options(text, OPTIONS_PER_ANSWER) or []
    cleaned = list(dict.fromkeys(p for option in found if (p := plain_phrase(option))))
    return cleaned if len(cleaned) == OPTIONS_PER_ANSWER else None


def ask_until_parsed(
    chat: ChatModel,
    requests: list[str],
    parse: Callable[[int, str], object | None],
    sampling: Sampling,
    retries: int,
    seed: int,
    unit: str,
    progress: LLMProgress,
) -> tuple[list, AnswerCounts, LLMUsage]:
    """Parsed answers (None where every try failed), their counts and the LLM usage.

    Try ``t`` asks the questions still unanswered in one call, sampled from ``derive_seed(seed, unit,
    t)``, and is stored as progress unit ``f"{unit}/{t}"``; a stored unit is not asked again.
    """
    parsed: list = [None] * len(requests)
    usage = LLMUsage()
    first_try_failed = 0
    pending = list(range(len(requests)))
    for attempt in range(retries + 1):
        if not pending:
            break
        name = f"{unit}/{attempt}"
        done = progress.get(name)
        if done is None:
            asked = [requests[i] for i in pending]
            answers = chat.complete(asked, sampling, derive_seed(seed, unit, attempt))
            done = {
                "answers": [parse(i, answer) for i, answer in zip(pending, answers, strict=True)],
                "usage": [
                    len(asked),
                    sum(chat.count_tokens(r) for r in asked),
                    sum(chat.count_tokens(a) for a in answers),
                ],
            }
            progress.add(name, done)
        usage.add(LLMUsage(*done["usage"]))
        for i, value in zip(pending, done["answers"], strict=True):
            parsed[i] = value
        pending = [i for i in pending if parsed[i] is None]
        if attempt == 0:
            first_try_failed = len(pending)
    counts = AnswerCounts(
        used=len(requests) - first_try_failed, repaired=first_try_failed - len(pending), replaced=len(pending)
    )
    return parsed, counts, usage


def ask_paper_options(
    domain: Domain,
    chat: ChatModel,
    options_per_dimension: int,
    sampling: Sampling,
    retries: int,
    seed: int,
    progress: LLMProgress,
) -> PaperOptions:
    """The superclass of every class (asked when the domain has a domain word), then
    ceil(options_per_dimension / 5) rounds of option lists per class and dimension.

    ``sampling.max_new_tokens`` bounds the option answers; the superclass answer gets at most 32.
    A failed option list takes the registry's options for that round (cycled if it holds too few).
    """
    classes, dimensions = domain.classnames, list(domain.contextual_dimensions)
    superclasses = [domain.superclass_of(c) for c in classes]
    result = PaperOptions(superclasses=superclasses, options=[{d: [] for d in dimensions} for _ in classes])
    if domain.domain_word:
        short = dataclasses.replace(
            sampling, max_new_tokens=min(SUPERCLASS_MAX_NEW_TOKENS, sampling.max_new_tokens)
        )

        def parse(i: int, text: str) -> str | None:
            found = parse_superclass(text, classes[i])
            return (plain_phrase(found) or None) if found else None

        answers, result.superclass_answers, usage = ask_until_parsed(
            chat,
            [superclass_request(domain.domain_word, c) for c in classes],
            parse,
            short,
            retries,
            seed,
            "superclass",
            progress,
        )
        result.usage.add(usage)
        result.superclasses = [
            answer or fallback for answer, fallback in zip(answers, superclasses, strict=True)
        ]
    keys = [(ci, d) for ci in range(len(classes)) for d in dimensions]
    requests = [
        options_request(
            domain.dimension_questions[d], classes[ci], domain.domain_word, result.superclasses[ci]
        )
        for ci, d in keys
    ]
    for round_index in range(math.ceil(options_per_dimension / OPTIONS_PER_ANSWER)):
        lists, counts, usage = ask_until_parsed(
            chat,
            requests,
            lambda i, text: parse_option_list(text),
            sampling,
            retries,
            derive_seed(seed, round_index),
            f"options/{round_index}",
            progress,
        )
        result.usage.add(usage)
        result.option_answers.add(counts)
        start = round_index * OPTIONS_PER_ANSWER
        kept = min(OPTIONS_PER_ANSWER, options_per_dimension - start)
        for (ci, d), found in zip(keys, lists, strict=True):
            if found is None:
                registry = domain.contextual_dimensions[d]
                found = [registry[(start + j) % len(registry)] for j in range(kept)]
                result.fallback_options += kept
            result.options[ci][d] += found[:kept]
    return result
