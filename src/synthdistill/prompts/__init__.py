"""Stage 1: class names become text prompts (``prompts.jsonl``); see :mod:`synthdistill.prompts.write`.

Modules: ``write`` (the stage function), ``design`` (all-pairs and random combinations),
``templates`` (weighted per-dataset templates, token limit), ``llm`` (chat models, answer parsing,
resume), ``paper`` (the authors' LLM questions), ``scenes`` (our LLM scene-sentence generator).
"""

from synthdistill.prompts.llm import ChatModel, Sampling, TransformersChat, load_chat_model, progress_path
from synthdistill.prompts.records import AnswerCounts, LLMUsage, PromptRecord
from synthdistill.prompts.write import GENERATORS, PromptsSummary, write_prompts

__all__ = [
    "GENERATORS",
    "AnswerCounts",
    "ChatModel",
    "LLMUsage",
    "PromptRecord",
    "PromptsSummary",
    "Sampling",
    "TransformersChat",
    "load_chat_model",
    "progress_path",
    "write_prompts",
]
