"""Stage 5, predict: classify image files with an exported ONNX model, without PyTorch.

Everything a deployment needs and nothing more: the model's metadata (``ModelInfo``, also in
``labels.json``), the file names of an export, image loading and prediction with onnxruntime,
Pillow and numpy only; this module imports neither torch nor timm, so the same code shows how to
deploy the exported model. Images are prepared exactly as the student saw them in evaluation
(resize, centre crop, RGB in [0, 1]); normalisation happens inside the model. The PyTorch path
(``predict --student``) lives in :mod:`synthdistill.deploy.zero_shot` and reuses the loop here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from synthdistill import __version__
from synthdistill.errors import SynthdistillError
from synthdistill.registry import Domain

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
LABELS_NAME = "labels.json"
ONNX_NAME = "model.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
LOGIT_SCALE = 100.0
_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def require_export_extra():
    """Import (onnx, onnxruntime), or say how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise SynthdistillError(
            'ONNX export and prediction need onnx and onnxruntime; run `pip install "synthdistill[export]"`.'
        ) from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model tells its reader: stored in the ONNX metadata and in labels.json."""

    classnames: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    domain: str = ""
    teacher: str = ""
    student: str = ""
    embed_dim: int = 0
    templates: tuple[str, ...] = ()
    superclass: str = ""
    precision: str = "fp32"
    synthdistill_version: str = __version__
    format_version: int = EXPORT_FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "synthdistill_format_version": self.format_version,
            "synthdistill_version": self.synthdistill_version,
            "domain": self.domain,
            "classnames": list(self.classnames),
            "templates": list(self.templates),
            "superclass": self.superclass,
            "precision": self.precision,
            "preprocessing": {
                "image_size": self.image_size,
                "resize_mode": self.resize_mode,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "input": "images: float32 (N, 3, H, W), RGB in [0, 1]; the model normalises with mean/std",
            "outputs": {
                "logits": f"(N, C) float32, {LOGIT_SCALE:g} * cosine similarity to each class",
                "embedding": "(N, D) float32, L2-normalised image embedding in the teacher's space",
            },
            "teacher": self.teacher,
            "student": self.student,
            "embed_dim": self.embed_dim,
        }

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: one string per top-level key, JSON-encoded."""
        return {key: json.dumps(value) for key, value in self.to_json().items()}

    @classmethod
    def from_json(cls, data: dict, source: str) -> ModelInfo:
        """Read and check the format version; refuse files of another synthdistill export format."""
        version = data.get("synthdistill_format_version")
        if version is None:
            raise SynthdistillError(
                f"'{source}' carries no synthdistill metadata; export the model with `synthdistill export`."
            )
        if int(version) != EXPORT_FORMAT_VERSION:
            raise SynthdistillError(
                f"'{source}' has export format version {version} (synthdistill "
                f"{data.get('synthdistill_version', '?')}), but this synthdistill reads version "
                f"{EXPORT_FORMAT_VERSION}; re-export it with this version."
            )
        pre = data["preprocessing"]
        return cls(
            classnames=tuple(data["classnames"]),
            image_size=int(pre["image_size"]),
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            interpolation=pre.get("interpolation", "bicubic"),
            resize_mode=pre.get("resize_mode", "shortest"),
            domain=data.get("domain", ""),
            teacher=data.get("teacher", ""),
            student=data.get("student", ""),
            embed_dim=int(data.get("embed_dim", 0)),
            templates=tuple(data.get("templates", ())),
            superclass=data.get("superclass", ""),
            precision=data.get("precision", "fp32"),
            synthdistill_version=data.get("synthdistill_version", "unknown"),
            format_version=int(version),
        )

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> ModelInfo:
        try:
            return cls.from_json({key: json.loads(value) for key, value in props.items()}, source)
        except (ValueError, KeyError, TypeError):
            raise SynthdistillError(
                f"'{source}' has damaged synthdistill metadata; export the model again."
            ) from None


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first (softmax over the model's logits)."""

    path: str
    classes: list[str]
    probabilities: list[float]
    indices: list[int]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "top_k": [
                {"class": name, "index": index, "probability": probability}
                for name, index, probability in zip(
                    self.classes, self.indices, self.probabilities, strict=True
                )
            ],
        }


def image_extensions() -> set[str]:
    """File suffixes Pillow can open here (lower case, with the dot)."""
    return {ext.lower() for ext in Image.registered_extensions()}


def collect_images(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for image suffixes) and globs -> files, in order, once each.

    A named file is kept whatever its suffix (it is reported later if Pillow cannot read it).
    """
    extensions = image_extensions()
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions))
        elif any(char in item for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise SynthdistillError(f"The pattern '{item}' matches no file.")
            found.extend(collect_images([str(m) for m in matches]))
        else:
            raise SynthdistillError(f"'{item}' is not a file, a folder or a glob pattern that matches files.")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise SynthdistillError(f"No image files found in {', '.join(repr(i) for i in items)}.")
    return unique


def onnx_name(precision: str) -> str:
    """The export's file name of each form: model.onnx (fp32), model.fp16.onnx, model.int8.onnx."""
    return ONNX_NAME if precision == "fp32" else f"model.{precision}.onnx"


def prepare_image(image: Image.Image, info: ModelInfo) -> np.ndarray:
    """A PIL image -> (3, S, S) float32 RGB in [0, 1], resized and cropped as open_clip's eval transform.

    'shortest': shortest side to S then centre crop; 'longest': longest side to S then centre pad
    (black); 'squash': straight to S x S.
    """
    size = info.image_size
    resample = _INTERPOLATIONS.get(info.interpolation, Image.Resampling.BICUBIC)
    image = image.convert("RGB")
    width, height = image.size
    if info.resize_mode == "squash":
        image = image.resize((size, size), resample)
    else:
        if info.resize_mode == "longest":
            scale = size / max(width, height)
            new = (max(1, round(width * scale)), max(1, round(height * scale)))
        elif width <= height:  # torchvision's Resize(int): short side to size, long side truncated
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        if new != image.size:
            image = image.resize(new, resample)
        image = _center_crop_or_pad(image, size)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def load_image(path: str | Path, info: ModelInfo) -> np.ndarray:
    """An image file -> :func:`prepare_image`; OSError / UnidentifiedImageError for unreadable files."""
    with Image.open(path) as opened:
        return prepare_image(opened, info)


def _center_crop_or_pad(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        canvas = Image.new("RGB", (max(width, size), max(height, size)))
        canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
        image, (width, height) = canvas, canvas.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def read_labels(path: str | Path) -> ModelInfo:
    """An export's labels.json (the ModelInfo of its models), or one sentence on what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SynthdistillError(f"'{path}' does not exist; pass the labels.json of an export.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise SynthdistillError(f"'{path}' is not valid JSON; export the model again.") from None
    if not isinstance(data, dict):
        raise SynthdistillError(f"'{path}' is not a synthdistill labels.json; export the model again.")
    try:
        return ModelInfo.from_json(data, str(path))
    except (KeyError, TypeError, ValueError):
        raise SynthdistillError(
            f"'{path}' has damaged synthdistill metadata; export the model again."
        ) from None


def _info_from_props(props: dict[str, str], model_path: Path) -> ModelInfo:
    """The ModelInfo of an ONNX file: its metadata, else labels.json beside it."""
    if "synthdistill_format_version" in props:
        return ModelInfo.from_metadata(props, str(model_path))
    labels = model_path.parent / LABELS_NAME
    if labels.is_file():
        return read_labels(labels)
    return ModelInfo.from_json({}, str(model_path))


def _onnx_runner(model_path: Path) -> tuple[ModelInfo, Callable[[np.ndarray], np.ndarray]]:
    _, ort = require_export_extra()
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, ...) derive from Exception only
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SynthdistillError(
            f"'{model_path}' is not an ONNX model onnxruntime can load: {reason}"
        ) from None
    info = _info_from_props(session.get_modelmeta().custom_metadata_map, model_path)
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {input_name: images})[0]

    return info, run


def _batches(
    paths: list[Path], info: ModelInfo, batch_size: int, skipped: list[tuple[Path, str]]
) -> Iterator[tuple[list[Path], np.ndarray, int]]:
    """(names, (B, 3, S, S) images, files consumed); unreadable files go to ``skipped`` with the reason."""
    names: list[Path] = []
    arrays: list[np.ndarray] = []
    consumed = 0
    for path in paths:
        consumed += 1
        try:
            arrays.append(load_image(path, info))
            names.append(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            reason = (
                "is not an image Pillow can read"
                if isinstance(e, UnidentifiedImageError)
                else f"could not be decoded ({e})"
            )
            skipped.append((path, reason))
        if len(arrays) == batch_size:
            yield names, np.stack(arrays), consumed
            names, arrays, consumed = [], [], 0
    if arrays:
        yield names, np.stack(arrays), consumed


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify_files(
    run: Callable[[np.ndarray], np.ndarray],
    info: ModelInfo,
    images: list[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Prediction]:
    """Top-k of every readable image with ``run``: (B, 3, S, S) in [0, 1] -> (B, C) logits.

    Unreadable files are skipped and reported at the end, to ``on_skip(path, reason)`` or else as
    warnings of this module's logger; the rest are classified, in input order.
    """
    from synthdistill.progress import progress_bar

    if top_k < 1 or batch_size < 1:
        raise SynthdistillError("--top-k and --batch-size must be at least 1.")
    paths = collect_images(images)
    predictions: list[Prediction] = []
    k = min(top_k, len(info.classnames))
    skipped: list[tuple[Path, str]] = []
    with progress_bar(len(paths), "predict", unit="img") as progress:
        for names, batch, consumed in _batches(paths, info, batch_size, skipped):
            probabilities = softmax(run(batch).astype(np.float64))
            for name, row in zip(names, probabilities, strict=True):
                order = np.argsort(-row, kind="stable")[:k]
                predictions.append(
                    Prediction(
                        path=str(name),
                        classes=[info.classnames[i] for i in order],
                        probabilities=[float(row[i]) for i in order],
                        indices=[int(i) for i in order],
                    )
                )
            progress.update(consumed)
    if not predictions:
        path, reason = skipped[0]
        if len(paths) == 1:
            raise SynthdistillError(f"'{path}' {reason}.")
        raise SynthdistillError(f"None of the {len(paths)} files could be read (first: '{path}' {reason}).")
    for path, reason in skipped:
        if on_skip is None:
            log.warning("skipped '%s': it %s", path, reason)
        else:
            on_skip(path, reason)
    return predictions


def predict(
    model_path: Path,
    images: list[str],
    *,
    domain: Domain | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    on_skip: Callable[[Path, str], None] | None = None,
) -> list[Prediction]:
    """Classify images (files, folders, globs) with an exported ``.onnx`` file of any precision
    (fp32, fp16, int8), or the export folder holding ``model.onnx``.

    Class names come from the model's metadata; ``domain`` may rename them (same count only).
    A student folder is PyTorch's: :func:`synthdistill.deploy.zero_shot.predict_student`.
    Returns one Prediction per readable image, in input order (see :func:`classify_files`).
    """
    model_path = Path(model_path)
    if model_path.is_dir() and (model_path / ONNX_NAME).is_file():
        model_path = model_path / ONNX_NAME  # an export folder
    if model_path.is_dir() and (model_path / "config.json").is_file():
        raise SynthdistillError(
            f"'{model_path}' is a student folder, which runs on PyTorch: use `predict --student` "
            "(synthdistill.deploy.zero_shot.predict_student)."
        )
    if not (model_path.is_file() and model_path.suffix == ".onnx"):
        raise SynthdistillError(
            f"'{model_path}' is neither an exported .onnx file nor an export folder holding {ONNX_NAME}."
        )
    info, run = _onnx_runner(model_path)
    if domain is not None:
        if domain.num_classes != len(info.classnames):
            raise SynthdistillError(
                f"The class list has {domain.num_classes} classes but '{model_path}' was exported "
                f"with {len(info.classnames)}; pass a list of the same classes, or none to use "
                "the model's."
            )
        info = dataclasses.replace(info, classnames=domain.classnames)
    return classify_files(run, info, images, top_k=top_k, batch_size=batch_size, on_skip=on_skip)
