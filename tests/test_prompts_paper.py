"""The ``paper`` generator (PAPER.md, Stage 1) with scripted chat models and the tiny random LLM."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from paper_chat import PaperChat, SeededChat, option_text, resume_setup
from prompt_checks import read_lines, uncovered_pairs
from synthdistill.cli import main
from synthdistill.config import PromptsConfig
from synthdistill.prompts import progress_path, write_prompts
from synthdistill.registry import get_dataset

PETS3 = dataclasses.replace(get_dataset("pets"), classnames=("Abyssinian", "Beagle", "Pug"))
DIMENSIONS = list(PETS3.contextual_dimensions)


class ScriptedChat(PaperChat):
    """Pug's superclass never parses; Abyssinian's camera angles never parse; Beagle's first time-of-day
    list has 4 items (asked again); Pug's locations come in a chatty, bold, labelled format."""

    def superclass_answer(self, classname, n, seed):
        return {
            "Abyssinian": "Sure! An Abyssinian is a type of shorthair cat.",
            "Beagle": "Hound",
            "Pug": "I am not sure what you mean by that, could you clarify",
        }[classname]

    def options_answer(self, classname, dimension, n, seed):
        if classname == "Abyssinian" and dimension == "camera_angle":
            return "I cannot answer that."
        if classname == "Beagle" and dimension == "time_of_day" and n == 0:
            return "\n".join(f"{k + 1}. {option_text(classname, dimension, n, k)}" for k in range(4))
        if classname == "Pug" and dimension == "location":
            return "Sure! Here are six places:\n\n" + "\n".join(
                f"{k + 1}) **In Park {n}{'abcdef'[k]}** - a sunny place" for k in range(6)
            )
        return super().options_answer(classname, dimension, n, seed)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted") / "prompts.jsonl"
    chat = ScriptedChat(PETS3)
    config = PromptsConfig(generator="paper", options_per_dimension=10, llm_retries=2)
    summary = write_prompts(PETS3, config, out, seed=0, chat_model=chat)
    return read_lines(out), summary, chat


def test_superclasses_are_parsed_retried_at_most_llm_retries_times_and_land_in_the_prompts(scripted):
    lines, summary, chat = scripted
    superclass = {line["class_name"]: line["superclass"] for line in lines}
    assert superclass == {
        "Abyssinian": "shorthair cat",
        "Beagle": "hound",
        "Pug": "dog",
    }  # Pug: the registry's
    counts = summary.superclass_answers
    assert (counts.used, counts.repaired, counts.replaced) == (2, 0, 1)
    assert chat.asked["superclass", "Pug"] == 1 + 2 and chat.asked["superclass", "Beagle"] == 1
    for line in lines:
        options = [line["options"][d] for d in DIMENSIONS]
        expected = f"A photo of a {line['class_name']}++++ ({line['superclass']}++, pet), " + ", ".join(
            options
        )
        assert line["prompt"] == expected and line["generator"] == "paper"


def test_option_lists_are_parsed_retried_and_filled_in_from_the_registry(scripted):
    lines, summary, chat = scripted
    by_class = {c: [x for x in lines if x["class_name"] == c] for c in PETS3.classnames}
    options = {
        c: {d: sorted({x["options"][d] for x in rows}) for d in DIMENSIONS} for c, rows in by_class.items()
    }
    assert options["Beagle"]["position"] == sorted(
        option_text("Beagle", "position", n, k) for n in (0, 1) for k in range(5)
    )
    assert options["Beagle"]["time_of_day"] == sorted(
        option_text("Beagle", "time_of_day", n, k)
        for n in (1, 2)
        for k in range(5)  # the 4-item answer re-asked
    )
    assert options["Pug"]["location"] == sorted(f"in Park {n}{'abcde'[k]}" for n in (0, 1) for k in range(5))
    registry = PETS3.contextual_dimensions["camera_angle"]
    assert options["Abyssinian"]["camera_angle"] == sorted(registry[:10])
    counts = summary.option_answers  # 2 rounds x 3 classes x 4 dimensions
    assert (counts.used, counts.repaired, counts.replaced) == (21, 1, 2)
    assert summary.fallback_options == 10
    assert (
        chat.asked["Abyssinian", "camera_angle"] == 2 * (1 + 2) and chat.asked["Beagle", "time_of_day"] == 3
    )
    for rows in by_class.values():
        assert len(rows) == 111  # the all-pairs design of 10 options per dimension
    for c, rows in by_class.items():
        assert uncovered_pairs(rows, options[c]) == []


def test_each_round_is_one_batched_call_with_the_papers_decoding(scripted):
    lines, summary, chat = scripted
    sizes = [size for size, _ in chat.calls]
    assert sizes == [3, 1, 1, 12, 2, 1, 12, 1, 1]  # superclasses, then per round all 12 questions at once
    superclass_sampling, option_sampling = chat.calls[0][1], chat.calls[3][1]
    assert (superclass_sampling.max_new_tokens, option_sampling.max_new_tokens) == (32, 128)
    assert (option_sampling.temperature, option_sampling.top_k, option_sampling.top_p) == (0.7, 50, 0.95)
    assert summary.llm_usage.conversations == len(chat.requests) == sum(sizes)
    assert summary.llm_usage.prompt_tokens == sum(len(r.split()) for r in chat.requests)
    assert all("6 numbered bullet points" in r for r in chat.requests[5:])
    assert chat.requests[0] == "What kind of pet is a Abyssinian? Answer with one noun only"
    assert "Where could a photo of a Beagle (pet) be taken?" in chat.requests[5 + 4]


def test_tiny_llm_runs_end_to_end_with_fallbacks_counted(tmp_path, capsys):
    """The real transformers path with a random Llama: its answers do not parse, the registry fills in."""
    out = tmp_path / "prompts.jsonl"
    settings = ["options_per_dimension=5", "llm_retries=1", "llm_max_new_tokens=16", "llm_batch_size=64"]
    argv = ["prompts", "--dataset", "pets", "--generator", "paper", "--llm", "tiny", "--out", str(out)]
    main([*argv, "--set", "device=cpu", *itertools.chain(*(["--set", f"prompts.{s}"] for s in settings))])
    text = capsys.readouterr().out
    lines = read_lines(out)
    assert len(lines) == 37 * 30 and Counter(x["class_name"] for x in lines)["Beagle"] == 30
    numbers = {
        what: tuple(
            int(n)
            for n in re.search(rf"LLM {what}: (\d+) used, (\d+) repaired on retry, (\d+)", text).groups()
        )
        for what in ("superclasses", "option lists")
    }
    assert sum(numbers["superclasses"]) == 37 and sum(numbers["option lists"]) == 37 * 4  # one round of 5
    used, repaired, replaced = numbers["option lists"]
    assert replaced >= 0.9 * 37 * 4  # gibberish: nearly every list is filled in from the registry
    assert f"options filled in from the registry: {5 * replaced}\n" in text
    retried = 37 * 4 - used + 37 - numbers["superclasses"][0]  # one retry each (llm_retries=1)
    assert f"LLM usage: {37 + 37 * 4 + retried:,} conversations" in text
    for name in ("Beagle", "Pug"):
        rows = [x for x in lines if x["class_name"] == name]
        options = {d: sorted({x["options"][d] for x in rows}) for d in DIMENSIONS}
        assert all(len(o) == 5 for o in options.values()) and uncovered_pairs(rows, options) == []
        assert all(x["prompt"].startswith(f"A photo of a {name}++++ (") for x in rows)


@pytest.mark.slow  # two subprocesses that import torch
def test_a_sigkilled_paper_run_resumes_by_round(tmp_path):
    domain, config = resume_setup()
    reference = tmp_path / "reference" / "prompts.jsonl"
    chat = SeededChat(domain)
    expected_summary = write_prompts(domain, config, reference, seed=0, chat_model=chat).to_dict()
    total_calls = len(chat.calls)
    assert (
        expected_summary["superclass_answers"]["repaired"] + expected_summary["option_answers"]["repaired"]
        > 0
    )
    for kill_at in (2, total_calls - 1):
        out = tmp_path / f"killed-{kill_at}" / "prompts.jsonl"
        script = Path(__file__).with_name("paper_chat.py")
        result = subprocess.run([sys.executable, str(script), str(out), str(kill_at)], capture_output=True)
        assert result.returncode == -9, result.stderr.decode()[-2000:]
        assert not out.exists() and len(progress_path(out).read_text().splitlines()) == 1 + kill_at - 1
        resumed_chat = SeededChat(domain)
        summary = write_prompts(domain, config, out, seed=0, chat_model=resumed_chat).to_dict()
        assert len(resumed_chat.calls) == total_calls - (kill_at - 1)
        assert out.read_bytes() == reference.read_bytes()
        assert {**summary, "path": None} == {**expected_summary, "path": None}
        assert list(out.parent.iterdir()) == [out]


def test_food_names_the_llm_superclass_and_imagenet_asks_none(tmp_path):
    config = PromptsConfig(generator="paper", options_per_dimension=5)
    food = dataclasses.replace(get_dataset("food101"), classnames=("apple pie", "ramen"))
    chat = PaperChat(food)
    chat.superclass_answer = lambda classname, n, seed: {"apple pie": "Dessert", "ramen": "Soup"}[classname]
    write_prompts(food, config, tmp_path / "food.jsonl", chat_model=chat)
    assert "How could a ramen (soup, food) be served in a photo? Answer with 6" in " ".join(chat.requests)
    assert {x["superclass"] for x in read_lines(tmp_path / "food.jsonl")} == {"dessert", "soup"}
    imagenet = dataclasses.replace(get_dataset("imagenet100"), classnames=("tabby cat", "goldfish"))
    chat = PaperChat(imagenet)
    summary = write_prompts(imagenet, config, tmp_path / "imagenet.jsonl", chat_model=chat)
    assert summary.superclass_answers is None and [size for size, _ in chat.calls] == [8]
    assert chat.requests[0].startswith("Where could a photo of a tabby cat be taken? Answer with 6 numbered")
    lines = read_lines(tmp_path / "imagenet.jsonl")
    assert len(lines) == 2 * 30 and all(x["options"]["location"].startswith("near ") for x in lines)
    assert all(x["prompt"].split("++++ , ")[1] == ", ".join(x["options"].values()) for x in lines)
