"""The report is built from a run directory's files alone, so `synthdistill report` can rebuild it."""

import json

from synthdistill.cli import main
from synthdistill.report import headline_lines, reading_notes, write_report
from synthdistill.rundir import RunDir
from synthdistill.shards import ShardWriter, encode_sample, shard_name


def make_run(root, make_image):
    run = RunDir(root)
    run.root.mkdir()
    run.write_config("name: demo\n")
    run.begin_stage("prompts", "h")
    run.finish_stage("prompts", "h", {"total": 4, "seconds": 1.5, "path": "ignored", "llm": None})
    lines = [{"class_index": c, "class_name": name, "prompt": f"a photo of a {name}", "seed": i}
             for i, (c, name) in enumerate([(0, "cat"), (0, "cat"), (1, "dog"), (1, "dog")])]  # fmt: skip
    run.prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ShardWriter(run.shards / shard_name(0)) as writer:
        for i, line in enumerate(lines):
            writer.write(f"{i:08d}", encode_sample(make_image(i), line))
    run.student.mkdir()
    log = [{"step": s, "loss": 1.0 / s, "cosine": 1 - 1.0 / (s + 1)} for s in range(1, 6)]
    (run.student / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    run.eval.mkdir()
    (run.eval / "results.md").write_text(
        "| dataset | model | top-1 |\n|---|---|---:|\n| pets | student | 88.0 |\n"
    )
    run.export.mkdir()
    (run.export / "model.onnx").write_bytes(b"x" * 2000)
    return run


def test_report_has_every_section_and_html_embeds_its_pictures(tmp_path, make_image, capsys):
    run = make_run(tmp_path / "demo", make_image)
    main(["report", str(run.root)])
    markdown = run.report_md.read_text()
    order = ["## Stages", "## Example prompts", "## Synthetic images", "## Training",
             "## Zero-shot evaluation", "## Export", "## Recipe"]  # fmt: skip
    assert [markdown.index(h) for h in order] == sorted(markdown.index(h) for h in order)
    assert "| prompts | done | 1.5 | 4 prompts |" in markdown  # a sentence, not the raw summary
    assert "a photo of a dog" in markdown and "model.onnx" in markdown
    assert "last step 5: loss 0.2, student-teacher cosine 0.8333" in markdown
    assert (run.root / "report_assets" / "samples.png").is_file()
    html = run.report_md.with_suffix(".html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "<td>88.0</td>" in html and "<details><summary>config.yaml" in html
    assert "report.md" in capsys.readouterr().out


def test_report_of_a_run_with_only_its_first_stage(tmp_path):
    run = RunDir(tmp_path / "early")
    run.root.mkdir()
    run.begin_stage("prompts", "h")
    main(["report", str(run.root)])
    markdown = run.report_md.read_text()
    assert "| prompts | running |" in markdown and "## Training" not in markdown


AGREEMENT = "agreement_with_teacher"


def _results(entries):
    base = {"protocol": "clip_benchmark", "headline_metric": "top1", "num_classes": 4, "top5": 1.0}
    return {"entries": [{**base, **e} for e in entries]}


def test_the_report_explains_tiny_models_synthetic_evaluation_and_a_teacher_at_chance(tmp_path, make_image):
    run = make_run(tmp_path / "demo", make_image)
    run.write_config("distill: {teacher: tiny, student: tiny}\ngenerate: {model: tiny}\n")
    synthetic = "demo (synthetic)"
    (run.eval / "results.json").write_text(json.dumps(_results([
        {"dataset": synthetic, "model": "teacher", "top1": 0.25, "headline": 0.25},
        {"dataset": synthetic, "model": "student", "top1": 0.5, "headline": 0.5, AGREEMENT: 0.75},
    ])))  # fmt: skip
    run.finish_stage("evaluate", "h", {f"{synthetic}/student/top1": 0.5, f"{synthetic}/agreement": 0.75})
    markdown = (write_report(run.root)).read_text()
    notes = markdown[markdown.index("## How to read these numbers") : markdown.index("## Stages")]
    assert (
        "Numbers from tiny random models mean nothing (teacher 'tiny', student 'tiny', diffusion model"
        in notes
    )
    assert "the run's own synthetic training images" in notes
    assert "teacher is at chance level on demo (synthetic) (25.0% top-1, chance 25.0% for 4 classes)" in notes
    assert "| evaluate | done |  | demo (synthetic): student 50.0% top-1, agreement 75.0% |" in markdown


def test_a_real_recipe_with_a_good_teacher_gets_no_warnings(tmp_path, make_image):
    run = make_run(tmp_path / "demo", make_image)
    run.write_config("distill: {teacher: ViT-B-32, student: tiny_vit_5m_224}\ngenerate: {model: sdxl}\n")
    (run.eval / "results.json").write_text(json.dumps(_results([
        {"dataset": "pets", "model": "teacher", "top1": 0.9, "headline": 0.9},
    ])))  # fmt: skip
    assert reading_notes(run) == []
    assert "## How to read these numbers" not in write_report(run.root).read_text()


def test_the_end_of_a_run_gives_both_numbers_agreement_export_and_a_predict_command(tmp_path, make_image):
    run = make_run(tmp_path / "demo run", make_image)
    (run.eval / "results.json").write_text(json.dumps(_results([
        {"dataset": "pets", "model": "teacher", "top1": 0.9, "headline": 0.875,
         "headline_metric": "mean_per_class_recall"},
        {"dataset": "pets", "model": "student", "top1": 0.8, "headline": 0.8125, AGREEMENT: 0.85,
         "headline_metric": "mean_per_class_recall"},
    ])))  # fmt: skip
    lines = headline_lines(run)
    assert lines[0] == "pets (mean per-class recall): student 81.2%, teacher 87.5%, agreement 85.0%"
    onnx = run.export / "model.onnx"
    assert lines[1] == f"exported: {onnx} (0.0 MB)"
    assert lines[2] == f"classify your photos: synthdistill predict --model '{onnx}' IMAGE"
