"""Stage 1: class names become diverse, domain-aware text prompts (``prompts.jsonl``).

Each prompt takes one option per contextual dimension of the domain (setting, lighting, viewpoint,
...) and names its class and superclass; that diversity is what lets a student trained on synthetic
images transfer to real ones (PAPER.md, stage 1). Two generators:

- ``template``: no model. Option combinations are drawn per class without replacement, so a class
  never repeats a prompt while unused combinations remain.
- ``llm``: an instruction-tuned chat model proposes the options of every dimension for every
  superclass, then writes one scene description per prompt that contains the class name. An answer
  that does not parse (or lacks the class name) is asked again once, then replaced by the registry's
  options or the template prompt of the same options; the summary counts each case. Each finished
  batch of answers is appended to a progress file beside the output (:class:`LLMProgress`), so an
  interrupted run resumes where it stopped and writes the same file as one that never stopped.

Every prompt fits the CLIP text encoder's context (77 tokens with start and end); longer ones are cut
at a word boundary and counted. Each line of the file::

    {"class_index": 0, "class_name": "Abyssinian", "prompt": "a photo of an Abyssinian, ...",
     "seed": <image seed>, "options": {"setting": "on a windowsill", ...}, "generator": "template"}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from synthdistill.config import PromptsConfig, config_hash
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path
from synthdistill.registry import Domain
from synthdistill.runtime import derive_seed, resolve_device
from synthdistill.tiny import create_tiny_llm, is_tiny

logger = logging.getLogger(__name__)

GENERATORS = ("template", "llm")
PROGRESS_FORMAT = 1  # part of the progress key: bump when what a unit stores changes
CLIP_CONTEXT_LENGTH = 77
RETRY_TEMPERATURE = 0.7
RETRY_REMINDER = "Follow the answer format exactly and nothing else."

# Dimensions that describe the subject itself come right after it; framing dimensions go last.
_SUBJECT_DIMENSIONS = ("activity", "condition", "serving", "material")
_FRAMING_DIMENSIONS = ("viewpoint", "scale", "style", "composition")


@dataclass
class PromptRecord:
    """One line of prompts.jsonl."""

    class_index: int
    class_name: str
    prompt: str
    seed: int
    options: dict[str, str]
    generator: str


@dataclass
class AnswerCounts:
    """How LLM answers fared: used as first given, used after one retry, or replaced by a fallback."""

    used: int = 0
    repaired: int = 0
    replaced: int = 0

    @property
    def total(self) -> int:
        return self.used + self.repaired + self.replaced


@dataclass
class PromptsSummary:
    """What ``write_prompts`` wrote; ``unique_share_*`` are distinct prompts / prompts within a class."""

    path: str
    generator: str
    total: int
    per_class: dict[str, int]
    unique_share_min: float
    unique_share_mean: float
    shortened: int
    llm: str | None = None
    option_answers: AnswerCounts | None = None
    prompt_answers: AnswerCounts | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        counts = sorted(set(self.per_class.values()))
        per_class = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        lines = [
            f"{self.total:,} {self.generator} prompts for {len(self.per_class)} classes "
            f"({per_class} per class) -> {self.path}",
            f"unique prompts per class: min {self.unique_share_min:.1%}, mean {self.unique_share_mean:.1%}",
            f"shortened to the text encoder's limit: {self.shortened}",
        ]
        for what, counts_of in (("option lists", self.option_answers), ("prompts", self.prompt_answers)):
            if counts_of is not None:
                lines.append(
                    f"LLM {what}: {counts_of.used} used, {counts_of.repaired} repaired on retry, "
                    f"{counts_of.replaced} replaced by templates"
                )
        return "\n".join(lines)


class ChatModel(Protocol):
    """What the ``llm`` generator needs from a language model: one answer per single-turn request."""

    def complete(self, requests: list[str], temperature: float, seed: int) -> list[str]:
        """Answers to ``requests`` (user messages); greedy at temperature 0, else sampled from ``seed``."""
        ...


class TransformersChat:
    """A transformers causal LM with a chat template: batched, left-padded generation."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def complete(self, requests: list[str], temperature: float, seed: int) -> list[str]:
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
        sample = temperature > 0
        generation = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=0.95 if sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id,
        )
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(**batch, generation_config=generation)
        answers = output[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(answers, skip_special_tokens=True)


def load_chat_model(name: str, device: str = "auto", max_new_tokens: int = 256) -> TransformersChat:
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
                f"Cannot load the LLM '{name}' ({reason}); pass a local folder with --llm "
                "(recipe key prompts.llm) or allow network access to the Hugging Face hub."
            ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise SynthdistillError(
            f"The LLM '{name}' has no chat template; use an instruction-tuned (chat) model for --llm."
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersChat(model.to(torch_device, dtype).eval(), tokenizer, max_new_tokens)


# ---- text helpers -------------------------------------------------------------------------------


def subject_phrase(domain: Domain, classname: str) -> str:
    """'a photo of an Abyssinian, a type of cat': article and wording follow the domain's templates.

    Food-like domains whose templates say 'a photo of {c}' get no article; texture-like ones whose
    templates say '{c} texture' put the superclass right after the class name.
    """
    superclass = domain.superclass_of(classname)
    templates = " ".join(domain.templates)
    article = "" if "of {c}" in templates else f"{_article(classname)} "
    if "{c} " + superclass in templates:
        return f"a photo of {article}{classname} {superclass}"
    return f"a photo of {article}{classname}, a type of {superclass}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _dimension_rank(dimension: str) -> int:
    if dimension in _SUBJECT_DIMENSIONS:
        return 0
    return 2 if dimension in _FRAMING_DIMENSIONS else 1


def compose_prompt(subject: str, options: dict[str, str]) -> str:
    """'<subject>, sleeping on a windowsill in soft morning light, close-up'."""
    ordered = sorted(options, key=_dimension_rank)
    scene = " ".join(options[d] for d in ordered if _dimension_rank(d) < 2)
    framing = [options[d] for d in ordered if _dimension_rank(d) == 2]
    return ", ".join(part for part in (subject, scene, *framing) if part)


def names_class(text: str, classname: str) -> bool:
    return classname.casefold() in text.casefold()


class TokenBudget:
    """Prompt length in CLIP BPE tokens (open_clip's tokenizer; start and end tokens count too)."""

    def __init__(self, max_tokens: int = CLIP_CONTEXT_LENGTH):
        self.limit = max_tokens - 2
        self.tokenizer = _clip_tokenizer()

    def fits(self, text: str) -> bool:
        return len(self.tokenizer.encode(text)) <= self.limit

    def shorten(self, text: str) -> str:
        """The longest word-boundary prefix that fits (trailing punctuation dropped); ``text`` if it fits."""
        if self.fits(text):
            return text
        words = text.split()
        low, high = 0, len(words)  # words[:low] fits, words[:high] does not
        while high - low > 1:
            middle = (low + high) // 2
            if self.fits(" ".join(words[:middle])):
                low = middle
            else:
                high = middle
        return " ".join(words[:low]).rstrip(" ,;:-")


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# ---- parsing LLM answers --------------------------------------------------------------------------

_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|[-*•·+])\s+(.*\S)\s*$")
_OPTION = re.compile(r"[^\W\d_][\w '’,&/()\-]*")
_LABEL_SEPARATOR = re.compile(r"\s+[-–—]\s+|:\s+")
_QUOTES = "\"'“”‘’`"


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
    return item.strip(_QUOTES).strip().rstrip(".;,").strip(_QUOTES).strip()


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


def parse_description(text: str, classname: str) -> str | None:
    """The first sentence-like piece of an answer that names ``classname``; None when there is none.

    Accepts a bare sentence, a JSON string or list, a numbered or bulleted line, or a sentence after
    a lead-in such as 'Here is the description:' on the same line.
    """
    pieces = _json_strings(text) or [line for line in text.splitlines() if line.strip()]
    for piece in pieces:
        marked = _LIST_MARKER.match(piece)
        piece = _clean_item(marked.group(1) if marked else piece)
        if ": " in piece and names_class(piece.split(": ", 1)[1], classname):
            piece = _clean_item(piece.split(": ", 1)[1])
        piece = " ".join(piece.split())
        if names_class(piece, classname) and len(piece.split()) >= 3 and piece.isprintable():
            return piece
    return None


# ---- generation ---------------------------------------------------------------------------------


def sample_combinations(sizes: list[int], count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """``count`` option-index tuples over dimensions of ``sizes`` options each.

    Drawn without replacement: all distinct while ``count`` <= prod(sizes); beyond that, every
    further round of prod(sizes) draws starts the combinations afresh.
    """
    total = math.prod(sizes)
    flat: list[int] = []
    while len(flat) < count:
        flat += rng.sample(range(total), min(total, count - len(flat)))
    combinations = []
    for index in flat:
        digits = []
        for size in reversed(sizes):
            index, digit = divmod(index, size)
            digits.append(digit)
        combinations.append(tuple(reversed(digits)))
    return combinations


def _choose_options(
    dimensions: dict[str, tuple[str, ...]], count: int, seed: int, class_index: int
) -> list[dict[str, str]]:
    rng = random.Random(derive_seed(seed, "prompts", class_index))
    names = list(dimensions)
    combinations = sample_combinations([len(dimensions[n]) for n in names], count, rng)
    return [{n: dimensions[n][i] for n, i in zip(names, combo, strict=True)} for combo in combinations]


def _template_records(
    domain: Domain, per_class: int, seed: int, dimensions_of: Callable[[str], dict[str, tuple[str, ...]]]
) -> list[PromptRecord]:
    records = []
    for class_index, classname in enumerate(domain.classnames):
        subject = subject_phrase(domain, classname)
        chosen = _choose_options(dimensions_of(classname), per_class, seed, class_index)
        for prompt_index, options in enumerate(chosen):
            records.append(
                PromptRecord(
                    class_index=class_index,
                    class_name=classname,
                    prompt=compose_prompt(subject, options),
                    seed=derive_seed(seed, "image", class_index, prompt_index),
                    options=options,
                    generator="template",
                )
            )
    return records


def progress_path(out_path: Path) -> Path:
    """Where an ``llm`` run keeps its finished batches until ``out_path`` is written: a hidden sibling."""
    return out_path.with_name(f".{out_path.name}.progress.jsonl")


class LLMProgress:
    """Parsed LLM answers of the batches finished so far, kept in a file so an interrupted run resumes.

    The file holds a header line ``{"key": ...}`` (a hash of everything that determines the answers),
    then one line per finished batch, ``{"unit": "prompts/first/24", "parsed": [...]}``, appended as
    the batch finishes. A file under another key is discarded; a line torn by a crash is dropped.
    The file is created with the first finished batch, never before.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.done: dict[str, list] = {}
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

    def get(self, unit: str) -> list | None:
        return self.done.get(unit)

    def add(self, unit: str, parsed: list) -> None:
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


def _ask(
    chat: ChatModel,
    requests: list[str],
    parse: Callable[[int, str], object | None],
    temperature: float,
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
    with tqdm(total=len(requests), initial=resumed, desc=f"LLM {unit}", unit="prompt", disable=None) as bar:
        for start in starts:
            done = progress.get(f"{unit}/{start}")
            if done is None:
                batch = requests[start : start + batch_size]
                answers = chat.complete(batch, temperature, derive_seed(seed, start))
                done = [parse(start + j, answer) for j, answer in enumerate(answers)]
                progress.add(f"{unit}/{start}", done)
                bar.update(len(batch))
            parsed += done
    return parsed


def _ask_with_retry(
    chat: ChatModel,
    requests: list[str],
    parse: Callable[[int, str], object | None],
    config: PromptsConfig,
    seed: int,
    what: str,
    progress: LLMProgress,
) -> tuple[list, AnswerCounts]:
    """Parsed answers (None where both tries failed) and their counts; a retry samples, with a reminder."""
    size, temperature = config.llm_batch_size, config.llm_temperature
    parsed = _ask(
        chat, requests, parse, temperature, derive_seed(seed, what), f"{what}/first", progress, size
    )
    failed = [i for i, value in enumerate(parsed) if value is None]
    if failed:
        again = [f"{requests[i]}\n{RETRY_REMINDER}" for i in failed]
        retry_temperature = max(temperature, RETRY_TEMPERATURE)
        retry_seed = derive_seed(seed, what, "retry")
        retried = _ask(
            chat,
            again,
            lambda j, text: parse(failed[j], text),
            retry_temperature,
            retry_seed,
            f"{what}/retry",
            progress,
            size,
        )
        for i, value in zip(failed, retried, strict=True):
            parsed[i] = value
    repaired = sum(parsed[i] is not None for i in failed)
    counts = AnswerCounts(len(requests) - len(failed), repaired, len(failed) - repaired)
    return parsed, counts


def _options_request(superclass: str, dimension: str, examples: tuple[str, ...], count: int) -> str:
    shown = "; ".join(f"'{e}'" for e in examples[:3])
    return (
        f"List {count} different options for the {dimension.replace('_', ' ')} of a photo of "
        f"{_article(superclass)} {superclass}. Each option is a short phrase of a few words that can "
        f"follow 'a photo of {_article(superclass)} {superclass},' such as {shown}. "
        "Answer with a numbered list only."
    )


def _description_request(subject: str, classname: str, options: dict[str, str]) -> str:
    details = "; ".join(f"{d.replace('_', ' ')}: {o}" for d, o in options.items())
    return (
        f"Write one sentence of at most 30 words that describes {subject}, with these details: "
        f'{details}. The sentence must contain the exact words "{classname}". '
        "Answer with the sentence only."
    )


def _llm_records(
    domain: Domain,
    config: PromptsConfig,
    per_class: int,
    seed: int,
    chat: ChatModel,
    budget: TokenBudget,
    progress: LLMProgress,
) -> tuple[list[PromptRecord], AnswerCounts, AnswerCounts]:
    """Options per (superclass, dimension) from the LLM, then one LLM description per prompt."""
    superclasses = list(dict.fromkeys(domain.superclass_of(c) for c in domain.classnames))
    keys = [(s, d) for s in superclasses for d in domain.contextual_dimensions]
    requests = [
        _options_request(s, d, domain.contextual_dimensions[d], config.options_per_dimension) for s, d in keys
    ]
    lists, option_counts = _ask_with_retry(
        chat,
        requests,
        lambda i, text: parse_options(text, config.options_per_dimension),
        config,
        seed,
        "options",
        progress,
    )
    suggested = {
        key: tuple(found) if found else domain.contextual_dimensions[key[1]]
        for key, found in zip(keys, lists, strict=True)
    }

    def dimensions_of(classname: str) -> dict[str, tuple[str, ...]]:
        superclass = domain.superclass_of(classname)
        return {d: suggested[superclass, d] for d in domain.contextual_dimensions}

    records = _template_records(domain, per_class, seed, dimensions_of)
    requests = [
        _description_request(subject_phrase(domain, r.class_name), r.class_name, r.options) for r in records
    ]

    def parse(i: int, text: str) -> str | None:
        description = parse_description(text, records[i].class_name)
        usable = description is not None and names_class(budget.shorten(description), records[i].class_name)
        return description if usable else None

    descriptions, prompt_counts = _ask_with_retry(chat, requests, parse, config, seed, "prompts", progress)
    for record, description in zip(records, descriptions, strict=True):
        if description is not None:
            record.prompt, record.generator = description, "llm"
    return records, option_counts, prompt_counts


def _check_inputs(domain: Domain, config: PromptsConfig, per_class: int) -> None:
    if config.generator not in GENERATORS:
        raise SynthdistillError(
            f"Unknown prompt generator '{config.generator}'; use one of {', '.join(GENERATORS)}."
        )
    if per_class <= 0:
        raise SynthdistillError(
            f"Prompts per class must be a positive number (--per-class); got {per_class}."
        )
    if not 8 <= config.max_prompt_tokens <= CLIP_CONTEXT_LENGTH:
        raise SynthdistillError(
            f"'prompts.max_prompt_tokens' must be between 8 and {CLIP_CONTEXT_LENGTH} (the CLIP text "
            f"encoder's context); got {config.max_prompt_tokens}."
        )
    if config.generator == "llm":
        for key in ("llm_batch_size", "llm_max_new_tokens", "options_per_dimension"):
            if getattr(config, key) < (2 if key == "options_per_dimension" else 1):
                raise SynthdistillError(f"'prompts.{key}' is too small ({getattr(config, key)}); raise it.")
    if not domain.classnames:
        raise SynthdistillError(f"Domain '{domain.name}' has no classes; name at least one class.")
    seen: set[str] = set()
    for classname in domain.classnames:
        if not classname.strip():
            raise SynthdistillError(f"Domain '{domain.name}' has a class name that is empty; remove it.")
        if classname.casefold() in seen:
            raise SynthdistillError(f"Class '{classname}' appears twice in '{domain.name}'; keep one.")
        seen.add(classname.casefold())


def write_prompts(
    domain: Domain,
    config: PromptsConfig,
    out_path: Path,
    seed: int = 0,
    device: str = "auto",
    chat_model: ChatModel | None = None,
) -> PromptsSummary:
    """Write ``per_class`` prompts for every class of ``domain`` to ``out_path`` (JSON Lines, atomically).

    ``chat_model`` replaces the LLM named by ``config.llm`` (any object with ``complete``); the
    template generator ignores it and ``device``. Bad input is refused before anything is written.
    The ``llm`` generator resumes from :func:`progress_path` when an earlier call under the same
    settings was interrupted, and deletes that file once ``out_path`` is written.
    """
    out_path = Path(out_path)
    per_class = config.per_class if config.per_class is not None else domain.images_per_class
    _check_inputs(domain, config, per_class)
    budget = TokenBudget(config.max_prompt_tokens)
    for classname in domain.classnames:
        if not budget.fits(subject_phrase(domain, classname)):
            raise SynthdistillError(
                f"Class name '{classname}' is too long for a {config.max_prompt_tokens}-token prompt; "
                "shorten it in the class file."
            )
    option_counts = prompt_counts = None
    if config.generator == "template":
        records = _template_records(domain, per_class, seed, lambda _: domain.contextual_dimensions)
    else:
        chat = chat_model or load_chat_model(config.llm, device, config.llm_max_new_tokens)
        identity = {
            "classnames": domain.classnames,
            "class_superclasses": [domain.superclass_of(c) for c in domain.classnames],
            "dimensions": domain.contextual_dimensions,
            "templates": domain.templates,
        }
        key = config_hash(PROGRESS_FORMAT, identity, config, per_class, seed)
        progress = LLMProgress(progress_path(out_path), key)
        records, option_counts, prompt_counts = _llm_records(
            domain, config, per_class, seed, chat, budget, progress
        )
    shortened = 0
    for record in records:
        fitted = budget.shorten(record.prompt)
        shortened += fitted != record.prompt
        record.prompt = fitted
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
    if config.generator == "llm":
        progress_path(out_path).unlink(missing_ok=True)
    by_class: dict[str, list[str]] = {c: [] for c in domain.classnames}
    for record in records:
        by_class[record.class_name].append(record.prompt)
    shares = [len(set(p)) / len(p) for p in by_class.values()]
    return PromptsSummary(
        path=str(out_path),
        generator=config.generator,
        total=len(records),
        per_class={c: len(p) for c, p in by_class.items()},
        unique_share_min=min(shares),
        unique_share_mean=sum(shares) / len(shares),
        shortened=shortened,
        llm=config.llm if config.generator == "llm" else None,
        option_answers=option_counts,
        prompt_answers=prompt_counts,
    )
