"""The report is built from a run directory's files alone, so `synthdistill report` can rebuild it."""

import json

from synthdistill.cli import main
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
    assert "| prompts | done | 1.5 | total: 4 |" in markdown  # paths and empty values left out
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
