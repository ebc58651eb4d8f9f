"""Chat models for the ``paper`` generator's tests: real ``ChatModel`` implementations that answer
from scripts (no transformers involved), and a runner for a subprocess that is SIGKILLed mid-run."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter

from synthdistill.prompts import Sampling
from synthdistill.registry import Domain
from synthdistill.runtime import derive_seed

SUPERCLASS = re.compile(r"What kind of (\w+) is a (.+)\? Answer with one noun only$")


class PaperChat:
    """Answers the paper's questions: superclass questions with ``superclass_answer(c, n)``, option
    questions with ``options_answer(c, dimension, n)``, where ``n`` counts earlier asks of the same
    question. Records every request and every call's (size, sampling)."""

    def __init__(self, domain: Domain):
        self.requests: list[str] = []
        self.calls: list[tuple[int, Sampling]] = []
        self.asked: Counter = Counter()
        self.patterns = []
        for dimension, question in domain.dimension_questions.items():
            pattern = re.escape(question).replace(re.escape("{c}"), "(?P<c>.+?)")
            if domain.domain_word is None:
                pattern = pattern.replace(re.escape(" ({domain})"), "")
            pattern = pattern.replace(re.escape("{s}"), ".+?")
            pattern = pattern.replace(re.escape("{domain}"), domain.domain_word or "")
            self.patterns.append((dimension, re.compile(pattern)))

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def complete(self, requests: list[str], sampling: Sampling, seed: int) -> list[str]:
        self.calls.append((len(requests), sampling))
        self.requests += requests
        return [self.answer(request, seed) for request in requests]

    def answer(self, request: str, seed: int) -> str:
        found = SUPERCLASS.match(request)
        if found:
            key = ("superclass", found.group(2))
            self.asked[key] += 1
            return self.superclass_answer(found.group(2), self.asked[key] - 1, seed)
        for dimension, pattern in self.patterns:
            found = pattern.match(request)
            if found:
                key = (found.group("c"), dimension)
                self.asked[key] += 1
                return self.options_answer(found.group("c"), dimension, self.asked[key] - 1, seed)
        raise AssertionError(f"unexpected request {request!r}")

    def superclass_answer(self, classname: str, n: int, seed: int) -> str:
        return "Cat"

    def options_answer(self, classname: str, dimension: str, n: int, seed: int) -> str:
        return "\n".join(f"{k + 1}. {option_text(classname, dimension, n, k)}" for k in range(6))


def option_text(classname: str, dimension: str, n: int, k: int) -> str:
    return f"near {classname.lower()} {dimension} {n}{'abcdef'[k]}"


class SeededChat(PaperChat):
    """Answers that depend only on (request, seed), as a seeded LLM's do: about one answer in three
    does not parse. ``kill_at``: this process SIGKILLs itself when that call (1-based) begins."""

    def __init__(self, domain: Domain, kill_at: int | None = None):
        super().__init__(domain)
        self.kill_at = kill_at

    def complete(self, requests: list[str], sampling: Sampling, seed: int) -> list[str]:
        if len(self.calls) + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().complete(requests, sampling, seed)

    def superclass_answer(self, classname: str, n: int, seed: int) -> str:
        draw = derive_seed(classname, seed)
        return "I am not sure." if draw % 3 == 0 else f"A {classname} is a type of kind{draw % 7}."

    def options_answer(self, classname: str, dimension: str, n: int, seed: int) -> str:
        draw = derive_seed(classname, dimension, seed)
        if draw % 3 == 0:
            return "I cannot list these."
        return "\n".join(
            f"{k + 1}. near {classname.lower()} {dimension} {draw % 1000}{'abcdef'[k]}" for k in range(6)
        )


def main() -> None:
    """``python paper_chat.py OUT KILL_AT``: the resume test's run, SIGKILLed at call KILL_AT."""
    from pathlib import Path

    from synthdistill.prompts import write_prompts

    domain, config = resume_setup()
    write_prompts(domain, config, Path(sys.argv[1]), seed=0, chat_model=SeededChat(domain, int(sys.argv[2])))


def resume_setup():
    import dataclasses

    from synthdistill.config import PromptsConfig
    from synthdistill.registry import get_dataset

    domain = dataclasses.replace(get_dataset("pets"), classnames=("Abyssinian", "Beagle", "Pug"))
    config = PromptsConfig(generator="paper", options_per_dimension=10, llm_retries=2)
    return domain, config


if __name__ == "__main__":
    main()
