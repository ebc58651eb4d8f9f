"""Stage 1: template and LLM prompts, the answer parser, length limits and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

import pytest

from synthdistill.cli import main
from synthdistill.config import PromptsConfig
from synthdistill.errors import SynthdistillError
from synthdistill.prompts import (
    RETRY_REMINDER,
    TokenBudget,
    compose_prompt,
    parse_description,
    parse_list,
    parse_options,
    progress_path,
    sample_combinations,
    subject_phrase,
    write_prompts,
)
from synthdistill.registry import Domain, get_dataset
from synthdistill.runtime import derive_seed

FIELDS = {"class_index", "class_name", "prompt", "seed", "options", "generator"}


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def small_domain(dimensions: dict[str, tuple[str, ...]], classnames=("robin", "blue jay")) -> Domain:
    return Domain(
        name="birds",
        title="birds",
        classnames=tuple(classnames),
        templates=("a photo of a {c}, a type of bird.",),
        superclass="bird",
        contextual_dimensions=dimensions,
        images_per_class=4,
    )


@pytest.fixture(scope="module")
def pets_file(tmp_path_factory):
    """The pets prompts at the default count (265 per class), written once for several tests."""
    path = tmp_path_factory.mktemp("pets") / "prompts.jsonl"
    summary = write_prompts(get_dataset("pets"), PromptsConfig(), path, seed=0)
    return path, summary


def test_pets_default_count_and_uniqueness(pets_file):
    path, summary = pets_file
    lines = read_lines(path)
    assert len(lines) == summary.total == 37 * 265 == 9805
    per_class = Counter(line["class_name"] for line in lines)
    assert set(per_class.values()) == {265} and summary.per_class == dict(per_class)
    shares = [len({x["prompt"] for x in lines if x["class_name"] == name}) / 265 for name in per_class]
    assert min(shares) >= 0.95
    assert summary.unique_share_min == pytest.approx(min(shares))
    assert summary.shortened == 0


def test_every_pets_prompt_names_its_class_and_superclass(pets_file):
    domain = get_dataset("pets")
    for line in read_lines(pets_file[0]):
        assert line["class_name"] in line["prompt"]
        assert f"a type of {domain.superclass_of(line['class_name'])}," in line["prompt"]
    assert "a photo of an Abyssinian, a type of cat, " in pets_file[0].read_text()


def test_pets_lines_follow_the_schema(pets_file):
    domain = get_dataset("pets")
    position = Counter()
    for line in read_lines(pets_file[0]):
        assert set(line) == FIELDS
        class_index = line["class_index"]
        assert domain.classnames[class_index] == line["class_name"]
        assert line["seed"] == derive_seed(0, "image", class_index, position[class_index])
        position[class_index] += 1
        assert set(line["options"]) == set(domain.contextual_dimensions)
        for dimension, choice in line["options"].items():
            assert choice in domain.contextual_dimensions[dimension]
            assert choice in line["prompt"]
        assert line["generator"] == "template"


def test_template_is_deterministic_for_a_seed(tmp_path):
    domain, config = get_dataset("flowers102"), PromptsConfig(per_class=5)
    first, again, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_prompts(domain, config, first, seed=3)
    write_prompts(domain, config, again, seed=3)
    write_prompts(domain, config, other, seed=4)
    assert first.read_bytes() == again.read_bytes()
    prompts = [x["prompt"] for x in read_lines(first)]
    assert sum(a != b for a, b in zip(prompts, (x["prompt"] for x in read_lines(other)), strict=True)) > 400


def test_no_repeat_while_unused_combinations_remain(tmp_path):
    domain = small_domain(
        {"setting": ("in a tree", "on a fence"), "lighting": ("at dawn", "at noon", "at dusk")}
    )
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, PromptsConfig(per_class=6), path)
    assert summary.unique_share_min == 1.0  # all 2 x 3 combinations, each once
    summary = write_prompts(domain, PromptsConfig(per_class=9), path)
    robin = [x["prompt"] for x in read_lines(path) if x["class_name"] == "robin"]
    assert len(set(robin[:6])) == 6 and len(set(robin)) == 6 and summary.unique_share_min == 6 / 9


def test_sample_combinations_rounds_cover_everything():
    import random

    combos = sample_combinations([2, 3, 2], 12 * 2 + 5, random.Random(0))
    assert len(set(combos[:12])) == 12 and len(set(combos[12:24])) == 12 and len(set(combos[24:])) == 5
    assert all(0 <= a < 2 and 0 <= b < 3 and 0 <= c < 2 for a, b, c in combos)


def test_subject_follows_the_domain_wording():
    assert subject_phrase(get_dataset("pets"), "Beagle") == "a photo of a Beagle, a type of dog"
    assert subject_phrase(get_dataset("food101"), "apple pie") == "a photo of apple pie, a type of food"
    assert subject_phrase(get_dataset("dtd"), "banded") == "a photo of a banded texture"
    options = {"viewpoint": "close-up", "setting": "in a park", "activity": "running"}
    assert compose_prompt("S", options) == "S, running in a park, close-up"


def test_user_class_file_through_the_cli(tmp_path, capsys):
    classes = tmp_path / "birds.txt"
    classes.write_text("# my birds\nrobin\n\nblue jay  # corvid\nAmerican goldfinch\n")
    out = tmp_path / "out" / "prompts.jsonl"
    main(
        ["prompts", "--classes", str(classes), "--superclass", "bird", "--per-class", "7", "--out", str(out)]
    )
    lines = read_lines(out)
    assert Counter(x["class_name"] for x in lines) == {"robin": 7, "blue jay": 7, "American goldfinch": 7}
    assert all(x["class_name"] in x["prompt"] and "a type of bird" in x["prompt"] for x in lines)
    assert "21 template prompts for 3 classes (7 per class)" in capsys.readouterr().out


def test_cli_writes_into_the_run_directory_by_default(tmp_path):
    main(["prompts", "--dataset", "dtd", "--per-class", "2", "--set", f"run_dir={tmp_path / 'run'}"])
    assert len(read_lines(tmp_path / "run" / "prompts.jsonl")) == 47 * 2


@pytest.mark.parametrize(
    "args, classes_text, message",
    [
        (["--dataset", "petz"], None, "Unknown dataset 'petz'. Did you mean 'pets'? Known datasets: pets"),
        (["--dataset", "pets", "--per-class", "0"], None, "must be a positive number"),
        (["--classes", "{classes}"], "# nothing here\n\n", "holds no class names"),
        (["--classes", "{classes}"], "robin\nRobin\n", "line 2: 'Robin' repeats line 1"),
        (
            ["--dataset", "pets", "--generator", "llm", "--llm", "no-such-org/no-such-llm"],
            None,
            "Cannot load",
        ),
        (["--dataset", "pets", "--generator", "llm", "--llm", "./no/such/folder"], None, "does not exist"),
    ],
)
def test_bad_input_is_refused_without_output(tmp_path, capsys, args, classes_text, message):
    classes = tmp_path / "classes.txt"
    if classes_text is not None:
        classes.write_text(classes_text)
    out = tmp_path / "prompts.jsonl"
    argv = ["prompts", *[a.replace("{classes}", str(classes)) for a in args], "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert list(tmp_path.iterdir()) == ([classes] if classes_text is not None else [])


@pytest.mark.parametrize("classnames", [("robin", " "), ("robin", "ROBIN"), ("a " + "very long " * 40,)])
def test_unusable_class_names_are_refused(tmp_path, classnames):
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(SynthdistillError):
        write_prompts(small_domain({"setting": ("in a tree",)}, classnames), PromptsConfig(), out)
    assert not out.exists()


def test_long_prompts_are_cut_at_a_word_boundary(tmp_path):
    domain, config = get_dataset("cars"), PromptsConfig(per_class=3, max_prompt_tokens=32)
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, config, path)
    budget, shortened = TokenBudget(32), 0
    for line in read_lines(path):
        full = compose_prompt(subject_phrase(domain, line["class_name"]), line["options"])
        assert budget.fits(line["prompt"]) and line["class_name"] in line["prompt"]
        assert full.startswith(line["prompt"]) and full[len(line["prompt"]) :][:1] in ("", " ", ",")
        shortened += line["prompt"] != full
    assert summary.shortened == shortened > 0


# ---- the LLM generator -------------------------------------------------------------------------


def test_tiny_random_llm_gibberish_is_replaced_and_counted(tmp_path):
    """The real transformers path (chat template, left-padded batched generation) with a random Llama."""
    domain = small_domain({"setting": ("in a tree", "on a fence"), "lighting": ("at dawn", "at dusk")})
    config = PromptsConfig(
        generator="llm",
        llm="tiny",
        per_class=3,
        llm_batch_size=4,
        llm_max_new_tokens=12,
        options_per_dimension=3,
    )
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, config, path, seed=1, device="cpu")
    lines = read_lines(path)
    assert len(lines) == 6 and all(set(x) == FIELDS and x["class_name"] in x["prompt"] for x in lines)
    by_generator = Counter(x["generator"] for x in lines)
    answers = summary.prompt_answers
    assert answers.replaced == by_generator["template"] == 6  # gibberish never names the class
    assert answers.used + answers.repaired == by_generator["llm"] == 0
    assert summary.option_answers.total == 2 and summary.option_answers.replaced == 2
    assert all(x["options"]["setting"] in domain.contextual_dimensions["setting"] for x in lines)


class StubChat:
    """Answers like a well-behaved chat model, in a list or sentence format that depends only on the
    request and the batch seed (as a seeded LLM's answer does).

    Descriptions of 'blue jay' lack the class name until the retry reminder comes; descriptions with
    'at dusk' never name it.
    """

    OPTIONS = {
        "setting": "Sure! Settings:\n1. On a mossy branch\n2) **By a bird feeder**: seeds\n3. on a fence",
        "lighting": '```json\n["in soft dawn light", "under a grey sky", "In Harsh Noon Sun"]\n```',
        "viewpoint": "Options:\n- close-up\n* seen from below - looking up\n• in flight",
        "weather": "in the rain, in the snow; in fog",
    }

    def __init__(self):
        self.requests: list[str] = []

    def complete(self, requests: list[str], temperature: float, seed: int) -> list[str]:
        self.requests += requests
        return [self.answer(request, seed) for request in requests]

    def answer(self, request: str, seed: int) -> str:
        dimension = re.search(r"options for the (\w+) of a photo", request)
        if dimension:
            return self.OPTIONS[dimension.group(1)]
        classname = re.search(r'exact words "(.+?)"', request).group(1)
        setting = re.search(r"setting: ([^;]+);", request).group(1)
        if "at dusk" in request or (classname == "blue jay" and RETRY_REMINDER not in request):
            return "A small bird sits quietly."
        formats = [
            f"A {classname} perched {setting}.",
            f'Sure! Here is the description: "A {classname} resting {setting}."',
            json.dumps({"description": f"A {classname} seen {setting}."}),
            f"1. A {classname} waiting {setting}.",
        ]
        return formats[derive_seed(request, seed) % len(formats)]


def test_stub_llm_answers_are_parsed_and_counted(tmp_path):
    dimensions = {
        "setting": ("in a tree",),
        "lighting": ("at dusk",),
        "viewpoint": ("close-up",),
        "weather": ("x",),
    }
    domain = small_domain(dimensions)
    config = PromptsConfig(generator="llm", per_class=30, llm_batch_size=7, options_per_dimension=3)
    chat = StubChat()
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, config, path, seed=0, chat_model=chat)
    assert summary.option_answers.used == 4 and summary.option_answers.total == 4
    lines = read_lines(path)
    options = {d: {x["options"][d] for x in lines} for d in dimensions}
    assert options == {
        "setting": {"on a mossy branch", "by a bird feeder", "on a fence"},
        "lighting": {"in soft dawn light", "under a grey sky", "in Harsh Noon Sun"},
        "viewpoint": {"close-up", "seen from below", "in flight"},
        "weather": {"in the rain", "in the snow", "in fog"},
    }
    dusk = [x for x in lines if x["options"]["lighting"] == "at dusk"]
    assert dusk == []  # 'at dusk' came from the registry; the LLM's options replaced it
    llm_lines = [x for x in lines if x["generator"] == "llm"]
    assert all(x["class_name"] in x["prompt"] and x["options"]["setting"] in x["prompt"] for x in llm_lines)
    verbs = {re.search(r"(perched|resting|seen|waiting) ", x["prompt"]).group(1) for x in llm_lines}
    assert verbs == {"perched", "resting", "seen", "waiting"}  # every answer format was parsed
    assert not any(x["prompt"].startswith(("Sure", "{", "1.", '"')) for x in llm_lines)
    answers = summary.prompt_answers
    assert (answers.used, answers.repaired, answers.replaced) == (30, 30, 0)
    assert len(chat.requests) == 4 + 60 + 30  # option lists, descriptions, retries for blue jay


def test_stub_llm_answers_without_the_class_are_replaced(tmp_path):
    domain = small_domain({"setting": ("on a wall",), "lighting": ("at dusk",)}, classnames=("robin",))
    config = PromptsConfig(generator="llm", per_class=4, options_per_dimension=3)
    chat = StubChat()
    chat.OPTIONS = {"setting": "1. on a roof\n2. in a hedge", "lighting": "nothing useful here"}
    summary = write_prompts(domain, config, tmp_path / "p.jsonl", chat_model=chat)
    lines = read_lines(tmp_path / "p.jsonl")
    assert (summary.option_answers.used, summary.option_answers.replaced) == (1, 1)
    assert {x["options"]["lighting"] for x in lines} == {"at dusk"}  # the registry's option stays
    assert (summary.prompt_answers.used, summary.prompt_answers.replaced) == (0, 4)
    assert [x["generator"] for x in lines] == ["template"] * 4
    assert all(x["prompt"].startswith("a photo of a robin, a type of bird, ") for x in lines)


# ---- resuming an interrupted LLM run ------------------------------------------------------------


class InterruptingChat(StubChat):
    """StubChat that counts its calls (batches) and raises KeyboardInterrupt on call ``interrupt_at``.

    Its weather options parse only on the retry, and 'at dusk' is among its lighting options, so a
    run has option retries, repaired and replaced descriptions.
    """

    OPTIONS = {**StubChat.OPTIONS, "lighting": '["at dusk", "at noon", "under a grey sky"]'}

    def __init__(self, interrupt_at: int | None = None):
        super().__init__()
        self.calls = 0
        self.interrupt_at = interrupt_at

    def complete(self, requests: list[str], temperature: float, seed: int) -> list[str]:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().complete(requests, temperature, seed)

    def answer(self, request: str, seed: int) -> str:
        if "the weather of" in request and RETRY_REMINDER not in request:
            return "I cannot say."
        return super().answer(request, seed)


RESUME_DOMAIN = small_domain({"setting": ("x",), "lighting": ("y",), "viewpoint": ("z",), "weather": ("w",)})
RESUME_CONFIG = PromptsConfig(
    generator="llm", per_class=8, llm_batch_size=3, options_per_dimension=3, llm_temperature=0.5
)


def run_llm(out, chat, domain=RESUME_DOMAIN, config=RESUME_CONFIG, seed=0):
    return write_prompts(domain, config, out, seed=seed, chat_model=chat)


def without_path(summary) -> dict:
    return {k: v for k, v in summary.to_dict().items() if k != "path"}


@pytest.fixture(scope="module")
def llm_reference(tmp_path_factory):
    """An uninterrupted run: (file bytes, summary without its path, number of batches asked)."""
    out = tmp_path_factory.mktemp("reference") / "prompts.jsonl"
    chat = InterruptingChat()
    summary = run_llm(out, chat)
    # options: 2 batches + 1 retry; descriptions: 6 batches + retries of blue jay and 'at dusk'
    assert (summary.option_answers.used, summary.option_answers.repaired) == (3, 1)
    answers = summary.prompt_answers
    assert answers.used > 0 and answers.repaired > 0 and answers.replaced > 0
    assert chat.calls == 3 + 6 + math.ceil((answers.repaired + answers.replaced) / 3)
    return out.read_bytes(), without_path(summary), chat.calls


@pytest.mark.parametrize("interrupt_at", [1, 3, 5, -1])  # options, option retry, descriptions, last retry
def test_interrupted_llm_run_resumes_where_it_stopped(tmp_path, caplog, llm_reference, interrupt_at):
    expected, expected_summary, total_calls = llm_reference
    interrupt_at = interrupt_at if interrupt_at > 0 else total_calls
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_llm(out, InterruptingChat(interrupt_at))
    progress = progress_path(out)
    assert not out.exists() and progress.exists() == (interrupt_at > 1)
    if progress.exists():
        assert len(progress.read_text().splitlines()) == 1 + interrupt_at - 1  # header, finished batches
    chat = InterruptingChat()
    summary = run_llm(out, chat)
    assert chat.calls == total_calls - (interrupt_at - 1)
    assert out.read_bytes() == expected and without_path(summary) == expected_summary
    assert list(tmp_path.iterdir()) == [out]  # the progress file is gone
    assert ("resuming LLM prompts" in caplog.text) == (interrupt_at > 1)


def test_a_torn_progress_line_is_redone(tmp_path, llm_reference):
    expected, expected_summary, total_calls = llm_reference
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_llm(out, InterruptingChat(6))
    with open(progress_path(out), "a") as f:
        f.write('{"unit": "prompts/first/9", "par')  # a crash in the middle of a write
    chat = InterruptingChat()
    summary = run_llm(out, chat)
    assert chat.calls == total_calls - 5
    assert out.read_bytes() == expected and without_path(summary) == expected_summary


@pytest.mark.parametrize(
    "changed",
    [
        {"seed": 1},
        {"config": dataclasses.replace(RESUME_CONFIG, llm="another/llm")},
        {"config": dataclasses.replace(RESUME_CONFIG, llm_batch_size=4)},
        {"domain": dataclasses.replace(RESUME_DOMAIN, classnames=("blue jay", "robin"))},
    ],
)
def test_progress_from_other_settings_is_discarded(tmp_path, caplog, changed):
    out, fresh = tmp_path / "prompts.jsonl", tmp_path / "fresh" / "prompts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_llm(out, InterruptingChat(6))
    chat, fresh_chat = InterruptingChat(), InterruptingChat()
    summary = run_llm(out, chat, **changed)
    fresh_summary = run_llm(fresh, fresh_chat, **changed)
    assert "discarding LLM progress" in caplog.text and "resuming" not in caplog.text
    assert chat.calls == fresh_chat.calls > 5
    assert out.read_bytes() == fresh.read_bytes() and without_path(summary) == without_path(fresh_summary)
    assert not progress_path(out).exists()


def test_template_generator_ignores_llm_progress(tmp_path):
    out, clean = tmp_path / "prompts.jsonl", tmp_path / "clean" / "prompts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_llm(out, InterruptingChat(4))
    stale = progress_path(out).read_bytes()
    config = PromptsConfig(per_class=5)
    write_prompts(RESUME_DOMAIN, config, out)
    write_prompts(RESUME_DOMAIN, config, clean)
    assert out.read_bytes() == clean.read_bytes()
    assert progress_path(out).read_bytes() == stale
    assert list(clean.parent.iterdir()) == [clean]


@pytest.mark.parametrize(
    "text, items",
    [
        (
            "Here you go:\n1. on a beach\n2. in a forest\n\n3) at a lake\nHope this helps!",
            ["on a beach", "in a forest", "at a lake"],
        ),
        ("- **on a beach**\n* in a forest\n• at a lake", ["on a beach", "in a forest", "at a lake"]),
        ('Sure: ["on a beach", "in a forest"] enjoy', ["on a beach", "in a forest"]),
        ('{"options": ["on a beach", "in a forest"]}', ["on a beach", "in a forest"]),
        ('[{"option": "on a beach"}, {"option": "in a forest"}]', ["on a beach", "in a forest"]),
        ("on a beach, in a forest; at a lake.", ["on a beach", "in a forest", "at a lake"]),
    ],
)
def test_parse_list_formats(text, items):
    assert parse_list(text) == items


def test_parse_options_keeps_short_distinct_phrases():
    text = (
        "1. On a beach: sand and waves\n2. on a beach\n3. \ufffd\x13garbage\n4. In the Alps\n5. "
        + "word " * 12
    )
    assert parse_options(text, 10) == ["on a beach", "in the Alps"]
    assert parse_options(text, 1) == ["on a beach"]
    assert parse_options("1. on a beach", 10) is None


def test_parse_description_finds_the_sentence_naming_the_class():
    assert parse_description("Certainly!\n\n**A robin on a branch.**", "robin") == "A robin on a branch"
    assert parse_description('["A Robin in snow at dawn"]', "robin") == "A Robin in snow at dawn"
    assert parse_description("A bird on a branch.", "robin") is None
    assert parse_description("robin", "robin") is None
