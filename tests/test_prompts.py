"""Stage 1: the template and plain generators, the all-pairs design, weighted templates, the token
limit, bad input, and our ``llm`` scene-sentence generator (the ``paper`` generator: test_prompts_paper)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections import Counter

import pytest

from prompt_checks import read_lines, uncovered_pairs
from synthdistill.cli import main
from synthdistill.config import PromptsConfig
from synthdistill.errors import SynthdistillError
from synthdistill.prompts import progress_path, write_prompts
from synthdistill.prompts.design import sample_combinations
from synthdistill.prompts.llm import parse_description, parse_list, parse_options, parse_superclass
from synthdistill.prompts.scenes import RETRY_REMINDER
from synthdistill.prompts.templates import (
    TokenBudget,
    compose_prompt,
    plain_phrase,
    strip_weighting,
    subject_phrase,
)
from synthdistill.registry import Domain, get_dataset
from synthdistill.runtime import derive_seed

FIELDS = {"class_index", "class_name", "prompt", "seed", "options", "generator", "superclass"}


def small_domain(dimensions: dict[str, tuple[str, ...]], classnames=("robin", "blue jay")) -> Domain:
    placeholders = ", ".join(f"{{d{i + 1}}}" for i in range(len(dimensions)))
    return Domain(
        name="birds",
        title="birds",
        classnames=tuple(classnames),
        templates=("a photo of a {c}, a type of bird.",),
        superclass="bird",
        contextual_dimensions=dimensions,
        images_per_class=4,
        prompt_template="A photo of a {c}++++ , " + placeholders,
    )


@pytest.fixture(scope="module")
def pets_file(tmp_path_factory):
    """``synthdistill prompts --dataset pets --generator template``, written once for several tests."""
    path = tmp_path_factory.mktemp("pets") / "prompts.jsonl"
    main(["prompts", "--dataset", "pets", "--generator", "template", "--out", str(path)])
    return path


def test_pets_template_is_an_all_pairs_design_of_265_per_class(pets_file):
    domain, lines = get_dataset("pets"), read_lines(pets_file)
    assert len(lines) == 37 * 265 == 9805
    assert set(Counter(x["class_name"] for x in lines).values()) == {265}
    for classname in domain.classnames:
        rows = [x for x in lines if x["class_name"] == classname]
        assert uncovered_pairs(rows, domain.contextual_dimensions) == []
        assert len({x["prompt"] for x in rows}) == 265
    first, second = (tuple(x["options"].values()) for x in lines[::265][:2])
    assert first != second  # each class pairs the shared options in its own order


def test_pets_prompts_are_the_weighted_pets_template(pets_file):
    domain = get_dataset("pets")
    for line in read_lines(pets_file):
        options = [line["options"][d] for d in domain.contextual_dimensions]
        superclass = domain.superclass_of(line["class_name"])
        assert line["superclass"] == superclass
        assert line["prompt"] == f"A photo of a {line['class_name']}++++ ({superclass}++, pet), " + ", ".join(
            options
        )
    assert "A photo of a Abyssinian++++ (cat++, pet), " in pets_file.read_text()


def test_pets_lines_follow_the_schema(pets_file):
    domain = get_dataset("pets")
    position = Counter()
    for line in read_lines(pets_file):
        assert set(line) == FIELDS
        class_index = line["class_index"]
        assert domain.classnames[class_index] == line["class_name"]
        assert line["seed"] == derive_seed(0, "image", class_index, position[class_index])
        position[class_index] += 1
        assert list(line["options"]) == list(domain.contextual_dimensions)
        for dimension, choice in line["options"].items():
            assert choice in domain.contextual_dimensions[dimension]
        assert line["generator"] == "template"


@pytest.mark.parametrize("name", ["food101", "imagenet100"])
def test_datasets_with_30_options_give_1011_per_class(tmp_path, name):
    domain = get_dataset(name)
    domain = dataclasses.replace(domain, classnames=domain.classnames[:2])
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, PromptsConfig(), path)
    lines = read_lines(path)
    assert summary.per_class == {c: 1011 for c in domain.classnames} and len(lines) == 2 * 1011
    rows = [x for x in lines if x["class_index"] == 1]
    assert uncovered_pairs(rows, domain.contextual_dimensions) == []
    if name == "food101":
        line = lines[0]
        o = line["options"]
        assert line["prompt"] == (
            f"A photo of a (apple pie)1.2, ({o['serving']})1.5, Side angle, "
            f"background is a {o['background']}, background is not blurred, "
            f"({o['camera_angle']})0.1, ({o['time_of_day']})0.1"
        )
    else:  # one of CLIP's ImageNet templates, filled with the class, then the options
        tails = Counter()
        for line in lines:
            head, tail = line["prompt"].split("++++ , ")
            assert tail == ", ".join(line["options"].values())
            assert any(t.replace("{c}", line["class_name"]).rstrip(". ") == head for t in domain.templates)
            tails[head] += 1
        assert len(tails) > 40


def test_template_is_deterministic_for_a_seed(tmp_path):
    domain = dataclasses.replace(get_dataset("flowers102"), classnames=("rose", "lotus"))
    first, again, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for path, seed in ((first, 3), (again, 3), (other, 4)):
        write_prompts(domain, PromptsConfig(), path, seed=seed)
    assert first.read_bytes() == again.read_bytes()
    prompts = [x["prompt"] for x in read_lines(first)]
    assert sum(a != b for a, b in zip(prompts, (x["prompt"] for x in read_lines(other)), strict=True)) > 400


def test_per_class_with_allpairs_is_refused_unless_it_is_the_designs_size(tmp_path):
    domain, out = get_dataset("dtd"), tmp_path / "p.jsonl"
    with pytest.raises(
        SynthdistillError, match=r"\(16\) differs from the all-pairs design's 265.*design=random"
    ):
        write_prompts(domain, PromptsConfig(per_class=16), out)
    assert not out.exists()
    small = dataclasses.replace(domain, classnames=("banded",))
    assert write_prompts(small, PromptsConfig(per_class=265), out).total == 265
    summary = write_prompts(small, PromptsConfig(per_class=16, design="random"), out)
    assert summary.total == 16 and summary.design == "random"


def test_options_per_dimension_gives_the_designs_size(tmp_path):
    domain = dataclasses.replace(get_dataset("cars"), classnames=("Audi S4 Sedan 2012",))
    for options, size in ((5, 30), (10, 111)):
        path = tmp_path / f"{options}.jsonl"
        write_prompts(domain, PromptsConfig(options_per_dimension=options), path)
        lines = read_lines(path)
        assert len(lines) == size
        used = {d: tuple(o[:options]) for d, o in domain.contextual_dimensions.items()}
        assert uncovered_pairs(lines, used) == []
        assert all(set(x["options"][d] for x in lines) == set(used[d]) for d in used)


def test_random_design_repeats_no_combination_while_unused_ones_remain(tmp_path):
    domain = small_domain(
        {"setting": ("in a tree", "on a fence"), "lighting": ("at dawn", "at noon", "at dusk")}
    )
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, PromptsConfig(per_class=6, design="random"), path)
    assert summary.unique_share_min == 1.0  # all 2 x 3 combinations, each once
    summary = write_prompts(domain, PromptsConfig(per_class=9, design="random"), path)
    robin = [x["prompt"] for x in read_lines(path) if x["class_name"] == "robin"]
    assert len(set(robin[:6])) == 6 and len(set(robin)) == 6 and summary.unique_share_min == 6 / 9


def test_sample_combinations_rounds_cover_everything():
    combos = sample_combinations([2, 3, 2], 12 * 2 + 5, random.Random(0))
    assert len(set(combos[:12])) == 12 and len(set(combos[12:24])) == 12 and len(set(combos[24:])) == 5
    assert all(0 <= a < 2 and 0 <= b < 3 and 0 <= c < 2 for a, b, c in combos)


@pytest.mark.parametrize(
    "dataset, prompt", [("pets", "a photo of a Beagle"), ("dtd", "a photo of a banded texture")]
)
def test_plain_is_the_no_diversity_baseline(tmp_path, dataset, prompt):
    domain = get_dataset(dataset)
    classname = prompt.split("a photo of a ")[1].removesuffix(" texture")
    domain = dataclasses.replace(domain, classnames=(classname, domain.classnames[1]))
    path = tmp_path / "p.jsonl"
    summary = write_prompts(domain, PromptsConfig(generator="plain", per_class=7), path)
    lines = [x for x in read_lines(path) if x["class_name"] == classname]
    assert [x["prompt"] for x in lines] == [prompt] * 7 and summary.total == 14
    assert all(x["options"] == {} and x["generator"] == "plain" for x in lines)
    assert len({x["seed"] for x in lines}) == 7
    assert write_prompts(domain, PromptsConfig(generator="plain"), path).total == 2 * 265


def test_subject_follows_the_domain_wording():
    pets, food, dtd = get_dataset("pets"), get_dataset("food101"), get_dataset("dtd")
    assert subject_phrase(pets.templates, "Beagle", "dog") == "a photo of a Beagle, a type of dog"
    assert subject_phrase(food.templates, "apple pie", "food") == "a photo of apple pie, a type of food"
    assert subject_phrase(dtd.templates, "banded", "texture") == "a photo of a banded texture"
    options = {"camera_angle": "close-up", "location": "in a park", "position": "running"}
    assert compose_prompt("S", options) == "S, running in a park, close-up"


def test_user_class_file_gets_the_papers_other_dimensions_and_template(tmp_path, capsys):
    classes = tmp_path / "birds.txt"
    classes.write_text("# my birds\nrobin\n\nblue jay  # corvid\nAmerican goldfinch\n")
    out = tmp_path / "out" / "prompts.jsonl"
    main(["prompts", "--classes", str(classes), "--superclass", "bird", "--out", str(out)])
    lines = read_lines(out)
    assert Counter(x["class_name"] for x in lines) == {
        "robin": 265,
        "blue jay": 265,
        "American goldfinch": 265,
    }
    assert list(lines[0]["options"]) == ["location", "time_of_day", "position", "camera_angle"]
    for line in lines:
        assert line["prompt"] == f"A photo of a {line['class_name']}++++ , " + ", ".join(
            line["options"].values()
        )
    assert "795 template prompts for 3 classes (265 per class, allpairs design)" in capsys.readouterr().out
    main(["prompts", "--classes", str(classes), "--per-class", "7", "--design", "random", "--out", str(out)])
    assert len(read_lines(out)) == 21


def test_cli_writes_into_the_run_directory_by_default(tmp_path):
    main(
        [
            "prompts",
            "--dataset",
            "dtd",
            "--per-class",
            "2",
            "--design",
            "random",
            "--set",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    assert len(read_lines(tmp_path / "run" / "prompts.jsonl")) == 47 * 2


@pytest.mark.parametrize(
    "args, classes_text, message",
    [
        (["--dataset", "petz"], None, "Unknown dataset 'petz'. Did you mean 'pets'? Known datasets: pets"),
        (["--dataset", "pets", "--per-class", "0"], None, "per_class"),
        (["--dataset", "pets", "--per-class", "16"], None, "drop per_class or set prompts.design=random"),
        (["--classes", "{classes}"], "# nothing here\n\n", "holds no class names"),
        (["--classes", "{classes}"], "robin\nRobin\n", "line 2: 'Robin' repeats line 1"),
        (["--classes", "{classes}"], b"robin\nm\xe9sange\n", "line 2 is not valid UTF-8"),
        (["--classes", "{classes}"], "robin\nblue\x07jay\n", "line 2 holds a control character"),
        (
            ["--dataset", "pets", "--generator", "paper", "--llm", "no-such-org/no-such-llm"],
            None,
            "Cannot load",
        ),
        (["--dataset", "pets", "--generator", "llm", "--llm", "./no/such/folder"], None, "does not exist"),
    ],
)
def test_bad_input_is_refused_without_output(tmp_path, capsys, args, classes_text, message):
    classes = tmp_path / "classes.txt"
    if isinstance(classes_text, bytes):
        classes.write_bytes(classes_text)
    elif classes_text is not None:
        classes.write_text(classes_text)
    out = tmp_path / "prompts.jsonl"
    argv = ["prompts", *[a.replace("{classes}", str(classes)) for a in args], "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    if classes_text is not None:
        assert str(classes) in err[0] or "class names" in err[0]
    assert list(tmp_path.iterdir()) == ([classes] if classes_text is not None else [])


@pytest.mark.parametrize("classnames", [("robin", " "), ("robin", "ROBIN"), ("a " + "very long " * 40,)])
def test_unusable_class_names_are_refused(tmp_path, classnames):
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(SynthdistillError):
        write_prompts(small_domain({"setting": ("in a tree",)}, classnames), PromptsConfig(), out)
    assert not out.exists()


def test_weighting_syntax_is_stripped_before_counting_tokens():
    assert (
        strip_weighting("A photo of a (apple pie)1.2, (on a plate)1.5, x")
        == "A photo of a apple pie, on a plate, x"
    )
    assert strip_weighting("A photo of a red- banded++++ texture+++, close-up shot, a rug---") == (
        "A photo of a red banded texture, close-up shot, a rug"
    )
    assert plain_phrase("(very) sunny+ park-") == "sunny park"
    budget = TokenBudget(12)  # 10 tokens of text
    assert budget.fits("a b c d e f g h i j") and budget.fits("a++++ b c d e f g h (i j)1.5")
    assert not budget.fits("a b c d e f g h i j k")


def test_long_weighted_prompts_lose_whole_parts_from_their_end(tmp_path):
    domain = dataclasses.replace(get_dataset("aircraft"), classnames=("Boeing 737-800", "Cessna 172"))
    config, path = PromptsConfig(max_prompt_tokens=24), tmp_path / "p.jsonl"
    summary = write_prompts(domain, config, path)
    budget, shortened = TokenBudget(24), 0
    for line in read_lines(path):
        o = line["options"]
        full = (
            f"A photo of a {o['colour']} {line['class_name']}+++ ({line['superclass']}----, aircraft), "
            f"{o['location']}+, {o['camera_angle']}+, {o['time_of_day']}"
        )
        assert budget.fits(line["prompt"]) and full.startswith(line["prompt"])
        assert full[len(line["prompt"]) :][:1] in ("", ",")  # cut before a top-level comma
        assert line["prompt"].count("(") == line["prompt"].count(")")
        shortened += line["prompt"] != full
    assert summary.shortened == shortened > 0


# ---- the LLM generator -------------------------------------------------------------------------


def test_tiny_random_llm_gibberish_is_replaced_and_counted(tmp_path):
    """The real transformers path (chat template, left-padded batched generation) with a random Llama."""
    domain = small_domain({"setting": ("in a tree", "on a fence"), "lighting": ("at dawn", "at dusk")})
    config = PromptsConfig(
        generator="llm",
        design="random",
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

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def complete(self, requests: list[str], sampling, seed: int) -> list[str]:
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
    config = PromptsConfig(
        generator="llm", design="random", per_class=30, llm_batch_size=7, options_per_dimension=3
    )
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
    config = PromptsConfig(generator="llm", design="random", per_class=4, options_per_dimension=3)
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

    def complete(self, requests: list[str], sampling, seed: int) -> list[str]:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().complete(requests, sampling, seed)

    def answer(self, request: str, seed: int) -> str:
        if "the weather of" in request and RETRY_REMINDER not in request:
            return "I cannot say."
        return super().answer(request, seed)


RESUME_DOMAIN = small_domain({"setting": ("x",), "lighting": ("y",), "viewpoint": ("z",), "weather": ("w",)})
RESUME_CONFIG = PromptsConfig(
    generator="llm",
    design="random",
    per_class=8,
    llm_batch_size=3,
    options_per_dimension=3,
    llm_temperature=0.5,
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
    config = PromptsConfig(per_class=5, design="random")
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


@pytest.mark.parametrize(
    "text, superclass",
    [
        ("Cat", "cat"),
        ("  Terrier.", "terrier"),
        ("Sure! A Beagle is a type of scent hound.", "scent hound"),
        ("The Abyssinian is a breed of domestic cat, known for ...", "domestic cat"),
        ("I'm not sure I understand the question, could you rephrase it please", None),
        ("Beagle", None),
        ("", None),
    ],
)
def test_parse_superclass(text, superclass):
    assert parse_superclass(text, "Beagle") == superclass


def test_whole_phrase_weighting_is_an_option_that_changes_only_the_syntax(tmp_path):
    domain = dataclasses.replace(get_dataset("pets"), classnames=("American Pit Bull Terrier", "Pug"))
    literal, grouped = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_prompts(domain, PromptsConfig(), literal)
    write_prompts(domain, PromptsConfig(weight_whole_phrases=True), grouped)
    pairs = list(zip(read_lines(literal), read_lines(grouped), strict=True))
    for a, b in pairs:
        assert a["options"] == b["options"] and strip_weighting(a["prompt"]) == strip_weighting(b["prompt"])
    a, b = pairs[0]
    assert a["prompt"].startswith("A photo of a American Pit Bull Terrier++++ (dog++, pet), ")
    assert b["prompt"].startswith("A photo of a (American Pit Bull Terrier)++++ (dog++, pet), ")
    assert pairs[-1][0]["prompt"] == pairs[-1][1]["prompt"]  # one-word class and unweighted options
