"""A student carries its preprocessing like an open_clip model: ``student.preprocess(image)``."""

import numpy as np
import torch

from synthdistill.student import load_student


def test_student_preprocess_is_the_evaluation_transform_and_the_onnx_model_takes_0_1_rgb(
    tmp_path, make_image
):
    import onnxruntime as ort
    from synthdistill.deploy.export import export_student

    from synthdistill.config import ExportConfig
    from synthdistill.evaluate.test_sets import validation_transform
    from synthdistill.registry import domain_from_classes
    from synthdistill.student import create_student, save_student
    from synthdistill.teacher import load_teacher

    teacher = load_teacher("tiny")
    torch.manual_seed(0)
    made = create_student("tiny", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny")
    save_student(made, tmp_path / "student")
    domain = domain_from_classes(["cat", "dog"], superclass="pet")
    export_student(tmp_path / "student", domain, tmp_path / "export", ExportConfig(bench=False))

    student = load_student(tmp_path / "student")
    image = make_image(3, size=97)
    tensor = student.preprocess(image)
    size = student.config.preprocessing.image_size
    assert tensor.shape == (3, size, size)
    assert torch.equal(tensor, validation_transform(student.config.preprocessing)(image))
    assert float(tensor.min()) < 0  # CLIP mean/std subtracted: a [0, 1] tensor has no negative values

    square = image.resize((size, size))
    rgb = np.asarray(square, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    session = ort.InferenceSession(
        str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    _, embedding = session.run(["logits", "embedding"], {"images": rgb})
    with torch.no_grad():
        expected = student(student.preprocess(square).unsqueeze(0)).numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-4)
