from pathlib import Path

import pytest

from synthdistill.cli import main


def test_datasets_list_shows_seven_datasets(capsys):
    main(["datasets", "list"])
    lines = capsys.readouterr().out.strip().splitlines()
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:]}
    assert counts == {
        "pets": 37,
        "flowers102": 102,
        "cars": 196,
        "food101": 101,
        "dtd": 47,
        "aircraft": 100,
        "imagenet100": 100,
    }


def test_datasets_show_aircraft(capsys):
    main(["datasets", "show", "aircraft"])
    out = capsys.readouterr().out
    assert "a photo of a {c}, a type of aircraft." in out
    assert "contextual dimensions:" in out and "707-320" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "show", "--set", "distill.lrr=1"], "Unknown key 'distill.lrr'"),
        (["config", "show", "--set", "distill.lr=abc"], "must be of type float"),
        (["config", "show", "-c", "missing.yaml"], "does not exist"),
        (["datasets", "show", "nope"], "Unknown dataset 'nope'"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_every_command_has_help(capsys):
    from synthdistill.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: synthdistill" in capsys.readouterr().out


def test_version_flag_prints_the_package_version(capsys):
    import synthdistill

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"synthdistill {synthdistill.__version__}"


def test_a_hint_names_the_failing_commands_own_flag_or_its_set_key(tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["evaluate", "--teacher-only", "--teacher", "tiny", "--datasets", "pets"]
    with pytest.raises(SystemExit):
        main([*argv, "--data-root", str(empty), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert "download it with --download," in err and "evaluate.download" not in err


def test_hints_are_rendered_per_command_and_as_keywords_in_the_api():
    from synthdistill.cli.common import cli_style
    from synthdistill.errors import SynthdistillError, argument, setting

    error = SynthdistillError(
        f"pass {setting('prompts.llm')}, {setting('evaluate.download', 'true')} or "
        f"{argument('--force', 'force=True')}"
    )
    assert str(error) == "pass prompts.llm=PATH, evaluate.download=true or force=True"
    under_run = error.render(cli_style({"device": "device"}))
    assert under_run == "pass --set prompts.llm=PATH, --set evaluate.download=true or --force"
    under_stage = error.render(cli_style({"llm": "prompts.llm", "download": "evaluate.download"}))
    assert under_stage == "pass --llm PATH, --download or --force"


def test_run_with_classes_and_no_superclass_warns_which_word_is_used(tmp_path, capsys):
    classes = tmp_path / "birds.txt"
    classes.write_text("robin\nwren\n")
    run = tmp_path / "run"
    main(["run", "configs/smoke.yaml", "--classes", str(classes), "--run-dir", str(run), "--until", "prompts",
          "--no-report", "--set", "superclass=null"])  # fmt: skip
    captured = capsys.readouterr()
    assert "warning: no --superclass" in captured.err and "'object'" in captured.err
    lines = (run / "prompts.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 16 and '"robin"' in lines[0]
    main(["run", "configs/smoke.yaml", "--classes", str(classes), "--superclass", "bird",
          "--run-dir", str(tmp_path / "run2"), "--until", "prompts", "--no-report"])  # fmt: skip
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert '"superclass": "bird"' in (tmp_path / "run2" / "prompts.jsonl").read_text()


def test_a_student_overlay_on_a_named_recipe_gets_a_suffixed_run_name():
    from synthdistill.config import load_recipe

    assert load_recipe(["configs/smoke.yaml", "configs/students/efficientnet_b0.yaml"]).name == (
        "smoke-efficientnet_b0"
    )
    assert load_recipe(["configs/pets.yaml", "configs/students/efficientnet_b0.yaml"]).name == (
        "pets-efficientnet_b0"
    )


def test_predict_json_lists_skipped_files_with_the_reason(tmp_path, capsys, make_image):
    import json

    import torch

    from synthdistill.student import create_student, save_student
    from synthdistill.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    student = create_student("tiny", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny")
    save_student(student, tmp_path / "student")
    make_image(1).save(tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    images = [str(tmp_path / "good.jpg"), str(tmp_path / "broken.jpg")]
    main(["predict", "--student", str(tmp_path / "student"), "--classes", str(classes), "--json", *images])
    rows = {Path(row["path"]).name: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"good.jpg", "broken.jpg"}
    assert len(rows["good.jpg"]["top_k"]) == 2 and "skipped" not in rows["good.jpg"]
    assert rows["broken.jpg"]["skipped"].startswith("it ") and "top_k" not in rows["broken.jpg"]


def test_two_distills_into_sibling_folders_keep_their_own_checkpoints(tmp_path, capsys, write_shards):
    shards = write_shards(tmp_path / "shards", 16, shard_size=16)
    common = ["distill", "--shards", str(shards), "--teacher", "tiny", "--student", "tiny", "--epochs", "1",
              "--batch-size", "8", "--workers", "0", "--device", "cpu", "--set", "distill.cache_views=1",
              "--set", "distill.teacher_pretrained=null", "--set", "distill.checkpoint_every=1"]  # fmt: skip
    main([*common, "--out", str(tmp_path / "A")])
    main([*common, "--out", str(tmp_path / "B"), "--lr", "1e-3"])  # other settings: refused if it shared A's
    for name in ("A", "B"):
        assert (tmp_path / name / "model.safetensors").is_file()
        assert [p.name for p in (tmp_path / name / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (tmp_path / "checkpoints").exists()
    main([*common, "--out", str(tmp_path / "run" / "student")])  # a run directory's layout
    assert (tmp_path / "run" / "checkpoints").is_dir() and not (
        tmp_path / "run" / "student" / "checkpoints"
    ).exists()


def test_prompts_warn_when_the_llm_contributed_nothing():
    from synthdistill.prompts.records import AnswerCounts
    from synthdistill.prompts.write import PromptsSummary

    def summary(prompt_answers: AnswerCounts) -> PromptsSummary:
        return PromptsSummary("p.jsonl", "llm", "random", 12, {"robin": 12}, 1.0, 1.0, 0, llm="tiny",
                              option_answers=AnswerCounts(used=4), prompt_answers=prompt_answers)  # fmt: skip

    none_used = summary(AnswerCounts(replaced=12)).describe()
    assert "warning: the LLM 'tiny' contributed no prompts: all 12 are the registry's fallback" in none_used
    assert "no option lists" not in none_used
    assert "warning" not in summary(AnswerCounts(used=1, replaced=11)).describe()
