"""One tiny export: the student's ``preprocess`` feeds PyTorch what the ONNX model takes as RGB in
[0, 1]; the model card says what the model was trained on and cannot do, and its onnxruntime
example classifies an image as `synthdistill predict` does."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from synthdistill.config import ExportConfig
from synthdistill.deploy.export import export_student
from synthdistill.deploy.predict import predict
from synthdistill.registry import domain_from_classes
from synthdistill.student import create_student, load_student, save_student
from synthdistill.teacher import load_teacher


@pytest.mark.slow  # one ONNX export: ~45 s on a loaded 2-core machine
def test_student_preprocess_matches_the_onnx_input_and_the_card_explains_and_runs(tmp_path, make_image):
    import onnxruntime as ort

    run = tmp_path / "run"
    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    student = create_student("tiny", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny")
    save_student(student, run / "student")
    (run / "shards").mkdir()
    settings = {"model": "tiny", "lora": None, "steps": 2, "guidance": 1.0}
    (run / "shards" / "index.json").write_text(json.dumps({"total": 1234, "settings": settings}))
    (run / "prompts.jsonl").write_text(json.dumps({"generator": "template", "prompt": "a cat"}) + "\n")
    (run / "config.yaml").write_text("name: demo\ndistill:\n  teacher: tiny\n")
    domain = domain_from_classes(["cat", "dog", "bird"], superclass="animal")
    export_student(run / "student", domain, run / "export", ExportConfig(bench=False))

    loaded = load_student(run / "student")
    image = make_image(3, size=97)
    assert torch.equal(loaded.preprocess(image), loaded.config.preprocessing.eval_transform()(image))
    assert float(loaded.preprocess(image).min()) < 0  # CLIP-normalised, unlike the ONNX model's input
    size = loaded.config.preprocessing.image_size
    square = image.resize((size, size))
    rgb = np.asarray(square, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    session = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    _, embedding = session.run(["logits", "embedding"], {"images": rgb})
    with torch.no_grad():
        expected_embedding = loaded(loaded.preprocess(square).unsqueeze(0)).numpy()
    np.testing.assert_allclose(embedding, expected_embedding, atol=1e-4)

    card = (run / "export" / "MODEL_CARD.md").read_text()
    training = card[card.index("## Training data") : card.index("## Evaluation")]
    assert "1,234 synthetic images (no real image) drawn by `tiny`, 2 steps, guidance 1.0" in training
    assert "the `template` generator" in training and "name: demo" in training
    limitations = card[card.index("## Limitations") :]
    assert "no 'none of these'" in limitations and "tiny random test models" in limitations

    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(snippet.strip().splitlines()) <= 13
    make_image(5, size=size).save(run / "export" / "photo.jpg")
    shown = subprocess.run(
        [sys.executable, "-c", snippet], cwd=run / "export", capture_output=True, text=True, check=True
    )
    (expected,) = predict(run / "export" / "model.onnx", [str(run / "export" / "photo.jpg")], top_k=1)
    assert shown.stdout.strip() == expected.classes[0]
