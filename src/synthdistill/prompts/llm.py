"""Chat models for stage 1: the model interface, the transformers implementation, answer parsing and
the progress file that lets an interrupted LLM run resume.

A :class:`ChatModel` answers single-turn requests in one batched call; anything that implements it
(a scripted model in the tests, a served model) can replace the transformers one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from synthdistill.errors import SynthdistillError, setting
from synthdistill.runtime import derive_seed, resolve_device
from synthdistill.tiny import create_tiny_llm, is_tiny

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded: greedy at temperature 0, else sampled (top-k / top-p when set)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


class ChatModel(Protocol):
    """What the LLM generators need from a language model."""

    def complete(self, requests: list[str], sampling: Sampling, seed: int) -> list[str]:
        """One answer per request (a user message), all requests in one call; sampled from ``seed``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` in the model's tokens (for the cost the summary reports)."""
        ...


class TransformersChat:
    """A transformers causal LM with a chat template: left-padded generation, ``batch_size`` rows at once.

    The requests of one call are cut into consecutive chunks; chunk k samples from
    ``derive_seed(seed, k * batch_size)``, so answers depend on (requests, seed, batch_size) only.
    """

    def __init__(self, model, tokenizer, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, requests: list[str], sampling: Sampling, seed: int) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            answers += self._generate(chunk, sampling, derive_seed(seed, start))
        return answers

    def _generate(self, requests: list[str], sampling: Sampling, seed: int) -> list[str]:
        import torch
        from transformers import GenerationConfig

        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
            )
            for request in requests
        ]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.model.device)
        sample = sampling.temperature > 0
        generation = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_k=(sampling.top_k or None) if sample else None,
            top_p=sampling.top_p if sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(**batch, generation_config=generation)
        answers = output[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)


def load_chat_model(name: str, device: str = "auto", batch_size: int = 8) -> TransformersChat:
    """A hub id, a local folder or 'tiny'; bf16 on GPU, fp32 on CPU. Refused in one sentence if unloadable."""
    import torch

    torch_device = resolve_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    if is_tiny(name):
        model, tokenizer = create_tiny_llm()
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise SynthdistillError(f"LLM folder '{name}' does not exist; pass a folder saved by transformers.")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except (OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SynthdistillError(
                f"Cannot load the LLM '{name}' ({reason}); pass a local folder with "
                f"{setting('prompts.llm')} or allow network access to the Hugging Face hub."
            ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise SynthdistillError(
            f"The LLM '{name}' has no chat template; use an instruction-tuned (chat) model: "
            f"{setting('prompts.llm', 'MODEL')}."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersChat(model.to(torch_device, dtype).eval(), tokenizer, batch_size)


# ---- parsing answers ----------------------------------------------------------------------------

_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|[-*•·+])\s+(.*\S)\s*$")
_OPTION = re.compile(r"[^\W\d_][\w '’,&/()\-]*")
_LABEL_SEPARATOR = re.compile(r"\s+[-–—]\s+|:\s+")
_QUOTES = "\"'“”‘’`"
_KIND_OF = re.compile(
    r"\b(?:type|kind|breed|variety|species|sort|form|family|class) of (?:an? |the )?([^\W\d_][\w'\- ]*)",
    re.IGNORECASE,
)
_NOUN = re.compile(r"[^\W\d_][\w'\-]*(?: [^\W\d_][\w'\-]*){0,2}")


def _json_strings(text: str) -> list[str]:
    """The strings of the first JSON list, object or string in ``text`` (code fences and chatter around it
    allowed); [] when there is none."""
    body = re.sub(r"```(?:json)?", "", text).strip()
    candidates = [body]
    for opening, closing in ("[]", "{}"):
        start, end = body.find(opening), body.rfind(closing)
        if 0 <= start < end:
            candidates.append(body[start : end + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            lists = [v for v in value.values() if isinstance(v, list)]
            value = lists[0] if lists else list(value.values())
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [next(iter(v.values()), None) if isinstance(v, dict) else v for v in value]
            strings = [v.strip() for v in value if isinstance(v, str) and v.strip()]
            if strings:
                return strings
    return []


def _clean_item(item: str) -> str:
    item = item.replace("**", "").replace("__", "").strip()
    return item.strip(_QUOTES).strip().rstrip(".;,!").strip(_QUOTES).strip()


def parse_list(text: str) -> list[str]:
    """The items of a list answer: a JSON list, numbered or bulleted lines, or one comma-separated line.

    Chatter around a marked list ('Sure! Here are ...:') is dropped; items come back cleaned of
    markers, quotes and bold, in order, not yet checked.
    """
    items = _json_strings(text)
    if not items:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        marked = [m.group(1) for line in lines if (m := _LIST_MARKER.match(line))]
        if marked:
            items = marked
        else:
            items = [line for line in lines if not line.endswith(":")]
            if len(items) == 1:
                items = re.split(r"[;,]\s*", items[0])
    return [cleaned for item in items if (cleaned := _clean_item(item))]


def parse_options(text: str, limit: int) -> list[str] | None:
    """Up to ``limit`` distinct short option phrases (lower-case start) from a list answer; None when
    fewer than two usable ones are there."""
    options: list[str] = []
    seen: set[str] = set()
    for item in parse_list(text):
        label = _clean_item(_LABEL_SEPARATOR.split(item, maxsplit=1)[0])
        words = label.split()
        if not _OPTION.fullmatch(label) or len(words) > 8 or len(label) > 60:
            continue
        if words[0][1:].islower() or len(words[0]) == 1:
            label = label[0].lower() + label[1:]
        if label.casefold() not in seen:
            seen.add(label.casefold())
            options.append(label)
    return options[:limit] if len(options) >= 2 else None


def parse_superclass(text: str, classname: str) -> str | None:
    """The noun phrase (at most three words) of a one-noun answer: 'Cat.', 'Sure! It is a type of
    terrier.'; None for anything else, and for the class name itself."""
    lines = [_clean_item(line) for line in text.splitlines() if _clean_item(line)]
    if not lines:
        return None
    candidate = lines[0]
    if not _NOUN.fullmatch(candidate):
        found = _KIND_OF.search(text)
        if found is None:
            return None
        candidate = _clean_item(re.split(r"[^\w'\- ]", found.group(1))[0])
        candidate = " ".join(candidate.split()[:3])
    if not candidate or not _NOUN.fullmatch(candidate) or candidate.casefold() == classname.casefold():
        return None
    return candidate.lower() if candidate[1:].islower() else candidate


def parse_description(text: str, classname: str) -> str | None:
    """The first sentence-like piece of an answer that names ``classname``; None when there is none.

    Accepts a bare sentence, a JSON string or list, a numbered or bulleted line, or a sentence after
    a lead-in such as 'Here is the description:' on the same line.
    """
    pieces = _json_strings(text) or [line for line in text.splitlines() if line.strip()]
    for piece in pieces:
        marked = _LIST_MARKER.match(piece)
        piece = _clean_item(marked.group(1) if marked else piece)
        if ": " in piece and classname.casefold() in piece.split(": ", 1)[1].casefold():
            piece = _clean_item(piece.split(": ", 1)[1])
        piece = " ".join(piece.split())
        if classname.casefold() in piece.casefold() and len(piece.split()) >= 3 and piece.isprintable():
            return piece
    return None


# ---- resuming -----------------------------------------------------------------------------------


def progress_path(out_path: Path) -> Path:
    """Where an LLM run keeps its finished units until ``out_path`` is written: a hidden sibling."""
    return out_path.with_name(f".{out_path.name}.progress.jsonl")


class LLMProgress:
    """Parsed LLM answers of the units (batches, rounds) finished so far, kept in a file so an
    interrupted run resumes.

    The file holds a header line ``{"key": ...}`` (a hash of everything that determines the answers),
    then one line per finished unit, ``{"unit": "prompts/first/24", "parsed": ...}``, appended as
    the unit finishes. A file under another key is discarded; a line torn by a crash is dropped.
    The file is created with the first finished unit, never before.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.done: dict[str, object] = {}
        self._has_header = False
        if path.exists():
            self._load()

    def _load(self) -> None:
        kept = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f):
                entry = _json_line(line)
                if number == 0:
                    if entry is None or entry.get("key") != self.key:
                        logger.warning(
                            "discarding LLM progress %s: it was made with other settings (domain, "
                            "prompts config, seed or LLM) or is unreadable; starting over",
                            self.path,
                        )
                        self.path.unlink()
                        return
                elif entry is None or not {"unit", "parsed"} <= entry.keys():
                    break  # torn by a crash: this line and any after it are redone
                else:
                    self.done[entry["unit"]] = entry["parsed"]
                kept += len(line)
        if kept < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(kept)
        self._has_header = kept > 0
        logger.warning("resuming LLM prompts: %d finished batches from %s", len(self.done), self.path)

    def get(self, unit: str):
        return self.done.get(unit)

    def add(self, unit: str, parsed) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if not self._has_header:
                f.write(json.dumps({"key": self.key}) + "\n")
                self._has_header = True
            f.write(json.dumps({"unit": unit, "parsed": parsed}) + "\n")
        self.done[unit] = parsed


def _json_line(line: bytes) -> dict | None:
    """The JSON object on a complete line (ending in a newline); None otherwise."""
    try:
        entry = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
