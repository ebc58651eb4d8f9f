"""Prompt text: PAPER.md's weighted per-dataset templates, the plain baseline, and the 77-token limit.

Templates are in Compel syntax (``word++`` multiplies a word's weight by 1.1 per ``+``, ``-`` by 0.9;
``(phrase)1.5`` weights a phrase) with the placeholders ``{c}`` (class), ``{s}`` (superclass),
``{d1}``...``{d4}`` (the dimensions' options in the registry's order) and ``{clip}`` (one of the
dataset's CLIP templates, filled with the class: ImageNet). The text encoder sees the text with the
syntax stripped, so that is what the token limit counts, and a prompt that is too long loses whole
comma-separated parts from its end, never part of a weighted phrase.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

CLIP_CONTEXT_LENGTH = 77

_PLACEHOLDER = re.compile(r"\{(c|s|clip|d[1-9])\}([+-]*)")
_WEIGHT_SUFFIX = re.compile(r"(?<=[^\s(,])[+-]+(?=[\s,)]|$)")
_PHRASE_WEIGHT = re.compile(r"\)\s*\d*\.?\d+")
# Subject-like dimensions come right after the subject, framing ones last (the ``llm`` generator's
# unweighted fallback prompts).
_SUBJECT_DIMENSIONS = ("position", "serving", "colour", "fabric")
_FRAMING_DIMENSIONS = ("camera_angle", "object")


def plain_phrase(text: str) -> str:
    """``text`` without weighting syntax (parenthesised asides, ``+``, word-final ``-``), for an LLM's
    option or superclass that goes into a weighted template."""
    text = re.sub(r"\([^)]*\)", " ", text)
    text = _WEIGHT_SUFFIX.sub("", text.replace("(", " ").replace(")", " ").replace("+", " "))
    return " ".join(text.split()).strip(" ,-")


def strip_weighting(prompt: str) -> str:
    """The text a Compel prompt gives the text encoder: weights and parentheses removed."""
    text = _WEIGHT_SUFFIX.sub("", _PHRASE_WEIGHT.sub(")", prompt))
    return " ".join(text.replace("(", " ").replace(")", " ").split()).replace(" ,", ",")


def fill_template(
    template: str,
    classname: str,
    superclass: str,
    options: list[str],
    clip_templates: tuple[str, ...] = (),
    rng: random.Random | None = None,
    whole_phrases: bool = False,
) -> str:
    """The template with its placeholders filled; ``{clip}`` takes one of ``clip_templates`` from ``rng``
    (its final full stop dropped, so that weighting after it applies to the class).

    Compel weights only the word before a ``+``/``-``, so 'Pit Bull Terrier++++' up-weights 'Terrier'
    alone, as the authors' templates do. ``whole_phrases`` writes '(Pit Bull Terrier)++++' instead,
    for every multi-word value (but ``{clip}``) that carries a weight.
    """

    def value(match: re.Match) -> str:
        name, weight = match.groups()
        if name == "clip":
            filled = (rng or random.Random(0)).choice(clip_templates).replace("{c}", classname).rstrip(". ")
            return filled + weight
        text = {"c": classname, "s": superclass}.get(name) or options[int(name[1:]) - 1]
        if whole_phrases and weight and " " in text:
            return f"({text}){weight}"
        return text + weight

    return _PLACEHOLDER.sub(value, template)


def _top_level_commas(prompt: str) -> list[int]:
    depth, positions = 0, []
    for index, char in enumerate(prompt):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            positions.append(index)
    return positions


def first_part(prompt: str) -> str:
    """A weighted prompt up to its first top-level comma: the part :meth:`TokenBudget.fit_weighted` keeps."""
    cuts = _top_level_commas(prompt)
    return prompt[: cuts[0]].rstrip() if cuts else prompt


class TokenBudget:
    """Prompt length in CLIP BPE tokens (open_clip's tokenizer; start and end tokens count too)."""

    def __init__(self, max_tokens: int = CLIP_CONTEXT_LENGTH):
        self.limit = max_tokens - 2
        self.tokenizer = _clip_tokenizer()

    def fits(self, text: str) -> bool:
        return len(self.tokenizer.encode(strip_weighting(text))) <= self.limit

    def shorten(self, text: str) -> str:
        """The longest word-boundary prefix that fits (trailing punctuation dropped); ``text`` if it fits.

        For unweighted text only; see :meth:`fit_weighted`.
        """
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

    def fit_weighted(self, prompt: str) -> str:
        """The longest prefix of ``prompt`` that ends before a top-level comma and fits; the first part
        alone (class and its weights, never cut) when nothing shorter fits."""
        if self.fits(prompt):
            return prompt
        for cut in reversed(_top_level_commas(prompt)):
            if self.fits(prompt[:cut]):
                return prompt[:cut].rstrip()
        return first_part(prompt)


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# ---- the ``llm`` generator's unweighted wording -------------------------------------------------


_CONSONANT_SOUND = ("eu", "ewe", "uni", "use", "usu", "uti", "ure", "uro", "uku", "ubiq", "one", "once")
"""Vowel letters sounded as a consonant: a European, a unicorn, a user, a one-eyed."""
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
"""A silent h: an hour, an honest, an heir."""
_VOWEL_LETTER_NAMES = "AEFHILMNORSX"
"""Capitals read letter by letter (up to three: NASA is read as a word) that start with a vowel
sound: an MRI, an SUV, an X-ray; a UFO."""


def article(word: str) -> str:
    """'a' or 'an' by how ``word`` sounds: a European robin, an hour, a unicorn, an MRI scanner."""
    first = word.split()[0] if word.split() else word
    letters = first.split("-")[0]
    if letters.isupper() and letters.isalpha() and len(letters) <= 3:  # read letter by letter
        return "an" if letters[0] in _VOWEL_LETTER_NAMES else "a"
    lower = first.lower()
    if lower[:1].isdigit():
        return "an" if lower.startswith(("8", "11", "18")) else "a"
    if lower.startswith(_SILENT_H):
        return "an"
    if lower.startswith(_CONSONANT_SOUND):
        return "a"
    return "an" if lower[:1] in ("a", "e", "i", "o", "u") else "a"


def subject_phrase(templates: tuple[str, ...], classname: str, superclass: str) -> str:
    """'a photo of an Abyssinian, a type of cat': article and wording follow the zero-shot templates.

    Food-like domains whose templates say 'a photo of {c}' get no article; texture-like ones whose
    templates say '{c} texture' put the superclass right after the class name.
    """
    joined = " ".join(templates)
    lead = "" if "of {c}" in joined else f"{article(classname)} "
    if "{c} " + superclass in joined:
        return f"a photo of {lead}{classname} {superclass}"
    return f"a photo of {lead}{classname}, a type of {superclass}"


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
