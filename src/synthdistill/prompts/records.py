"""The small types stage 1 hands around: one prompt line, and how LLM answers fared."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptRecord:
    """One line of prompts.jsonl. ``options`` maps each contextual dimension to its option (empty for
    ``plain``); ``superclass`` is the LLM's answer (``paper``) or the registry's word."""

    class_index: int
    class_name: str
    prompt: str
    seed: int
    options: dict[str, str]
    generator: str
    superclass: str


@dataclass
class AnswerCounts:
    """How LLM answers fared: used as first given, used after a retry, or replaced by a fallback."""

    used: int = 0
    repaired: int = 0
    replaced: int = 0

    @property
    def total(self) -> int:
        return self.used + self.repaired + self.replaced

    def add(self, other: AnswerCounts) -> None:
        self.used += other.used
        self.repaired += other.repaired
        self.replaced += other.replaced


@dataclass
class LLMUsage:
    """What the LLM was asked: conversations (requests answered) and tokens, requests and answers
    counted in the model's tokenizer (the chat template around a request not included)."""

    conversations: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def add(self, other: LLMUsage) -> None:
        self.conversations += other.conversations
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
