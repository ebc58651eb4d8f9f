"""The faster ONNX forms of an exported classifier and their own check against the fp32 model.

fp16 (onnxruntime's float16 converter, for GPU runtimes) and int8 (onnxruntime's static
quantization, calibrated on the run's own synthetic images) each trade accuracy for speed; the
trade is measured as top-1 agreement with the fp32 model on synthetic images the calibration never
saw, and on the real test sets evaluate ran on when they are given; a form below the threshold on
any of them is not written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synthdistill.deploy.latency import onnx_session
from synthdistill.deploy.predict import (
    ModelInfo,
    collect_images,
    load_image,
    prepare_image,
    require_export_extra,
)
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import temporary_name
from synthdistill.shards import ShardSamples, decode_image, list_shards

_SAMPLE_SEED = 0
_AGREEMENT_BATCH = 32


@dataclass
class TestAgreement:
    """A form's top-1 agreement with the fp32 model on the images of one real test set."""

    __test__ = False  # not a pytest test class

    test_set: str
    agreement: float
    images: int


@dataclass
class FormResult:
    """An fp16 or int8 form of the ONNX model and its own check: top-1 agreement with the fp32 model
    on held-out synthetic images, and on each real test set it was given."""

    precision: str
    path: Path | None
    agreement: float
    held_out_images: int
    calibration_images: int
    min_agreement: float
    test_agreements: list[TestAgreement] = field(default_factory=list)

    @property
    def written(self) -> bool:
        return self.path is not None

    def refusal(self) -> str:
        measured = [f"{self.agreement:.1%} on {self.held_out_images} held-out synthetic images"]
        measured += [f"{t.agreement:.1%} on {t.images} images of {t.test_set}" for t in self.test_agreements]
        return (
            f"The {self.precision} ONNX model was not written: its top-1 agreement with the fp32 model is "
            f"{' and '.join(measured)}, below export.min_agreement={self.min_agreement:g} on at least one; "
            f"lower the threshold or leave {self.precision} out."
        )

    def to_dict(self) -> dict:
        return {
            "written": self.written,
            "agreement": round(self.agreement, 4),
            "held_out_images": self.held_out_images,
            "calibration_images": self.calibration_images,
            "test_sets": {
                t.test_set: {"agreement": round(t.agreement, 4), "images": t.images}
                for t in self.test_agreements
            },
        }


def save_with_metadata(model, path: Path, info: ModelInfo) -> None:
    """Replace the model's metadata_props by ``info`` and save it to ``path``."""
    onnx, _ = require_export_extra()
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = (
        f"synthdistill zero-shot classifier ({info.precision}): {info.student} distilled from {info.teacher}"
    )
    onnx.save(model, str(path))


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch_size: int = 16) -> None:
    """Static int8 quantization with onnxruntime: QDQ format, per-channel int8 weights, uint8 activations
    (onnxruntime's advice for x86 CPUs), ranges calibrated (min/max) on ``calibration`` (N, 3, S, S)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            return None if start is None else {"images": calibration[start : start + batch_size]}

    prepared = temporary_name(out_path.with_name(f"{out_path.name}.prepared"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns on the root logger for every 1-D weight it skips
    try:
        # onnxruntime's symbolic shape inference cannot follow the exporter's dynamic Expand nodes;
        # ONNX's own shape inference and graph optimisation suffice for quantization
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_path),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and arithmetic (onnxruntime's float16 converter), fp32 input and outputs kept."""
    onnx, _ = require_export_extra()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "values clamped to fp16 range": the agreement says
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def top1_agreement(reference: Path, candidate: Path, images: np.ndarray) -> float:
    """Share of ``images`` (N, 3, S, S) on which two ONNX classifiers predict the same top-1 class."""
    predictions = []
    for path in (reference, candidate):
        session = onnx_session(path)
        logits = [
            session.run(["logits"], {"images": images[start : start + _AGREEMENT_BATCH]})[0]
            for start in range(0, len(images), _AGREEMENT_BATCH)
        ]
        predictions.append(np.concatenate(logits).argmax(axis=1))
    return float((predictions[0] == predictions[1]).mean())


@dataclass
class SampleImages:
    """Synthetic images for the fp16/int8 forms: disjoint calibration and held-out sets, (N, 3, S, S)."""

    source: Path
    calibration: np.ndarray
    held_out: np.ndarray
    calibration_keys: list[str]
    held_out_keys: list[str]


def read_sample_images(source: Path, info: ModelInfo, calibration: int, held_out: int) -> SampleImages:
    """Draw up to ``calibration`` + ``held_out`` readable images from ``source`` (a shard folder, an
    image folder or a glob) in a seeded random order, prepared as the model expects; the first go to
    calibration, the rest are held out. With fewer images, they are split in the same proportion."""
    source = Path(source)
    shards = list_shards(source) if source.is_dir() else []
    if shards:
        samples = ShardSamples(shards)
        keys = [samples.key(i) for i in range(len(samples))]

        def load(index: int) -> np.ndarray | None:
            image = decode_image(samples[index].image)
            return None if image is None else prepare_image(image, info)
    else:
        paths = collect_images([str(source)])
        keys = [str(p) for p in paths]

        def load(index: int) -> np.ndarray | None:
            try:
                return load_image(paths[index], info)
            except (OSError, ValueError):
                return None

    wanted = calibration + held_out
    picked: list[int] = []
    arrays: list[np.ndarray] = []
    for index in np.random.default_rng(_SAMPLE_SEED).permutation(len(keys)):
        array = load(int(index))
        if array is not None:
            picked.append(int(index))
            arrays.append(array)
        if len(picked) == wanted:
            break
    if len(picked) < 2:
        raise SynthdistillError(
            f"'{source}' holds {len(picked)} readable image(s), but the fp16/int8 forms need at least 2 to "
            "calibrate on and check against; set export.sample_images to a folder of synthetic images."
        )
    split = (
        calibration
        if len(picked) == wanted
        else max(1, min(len(picked) - 1, round(len(picked) * calibration / wanted)))
    )
    stacked = np.stack(arrays)
    return SampleImages(
        source=source,
        calibration=stacked[:split],
        held_out=stacked[split:],
        calibration_keys=[keys[i] for i in picked[:split]],
        held_out_keys=[keys[i] for i in picked[split:]],
    )


def test_set_images(test_set, info: ModelInfo, count: int) -> np.ndarray:
    """Up to ``count`` readable images of a real test set (an evaluate :class:`~synthdistill.evaluate.
    test_sets.TestSet`), spread over it, prepared as the deployed model's input: (N, 3, S, S)."""
    from synthdistill.evaluate.test_sets import make_loader

    loader = make_loader(
        test_set, [lambda image: prepare_image(image, info)], _AGREEMENT_BATCH, max_images=count
    )
    arrays: list[np.ndarray] = []
    for batch in loader:
        if batch.images:  # (one transform) -> its (B, 3, S, S) tensor
            arrays.append(batch.images[0].numpy())
        if sum(len(a) for a in arrays) >= count:  # a mirror is read in order: stop after count
            break
    if not arrays:
        raise SynthdistillError(f"No readable image in {test_set.source} to check the fp16/int8 forms on.")
    return np.concatenate(arrays)[:count]


def export_form(
    precision: str,
    fp32_path: Path,
    path: Path,
    info: ModelInfo,
    samples: SampleImages,
    min_agreement: float,
    test_images: Mapping[str, np.ndarray] | None = None,
) -> FormResult:
    """Write the ``precision`` form of ``fp32_path`` to ``path`` if its top-1 agreement with the fp32
    model reaches ``min_agreement`` on the held-out images and on each of ``test_images`` (test set
    name -> prepared images); otherwise write nothing."""
    onnx, _ = require_export_extra()
    tmp = temporary_name(path)
    try:
        if precision == "int8":
            quantize_int8(fp32_path, tmp, samples.calibration)
        else:
            convert_fp16(fp32_path, tmp)
        save_with_metadata(onnx.load(str(tmp)), tmp, dataclasses.replace(info, precision=precision))
        agreement = top1_agreement(fp32_path, tmp, samples.held_out)
        tests = [
            TestAgreement(name, top1_agreement(fp32_path, tmp, images), len(images))
            for name, images in (test_images or {}).items()
        ]
        written = min([agreement] + [t.agreement for t in tests]) >= min_agreement
        if written:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return FormResult(
        precision=precision,
        path=path if written else None,
        agreement=agreement,
        held_out_images=len(samples.held_out),
        calibration_images=len(samples.calibration) if precision == "int8" else 0,
        min_agreement=min_agreement,
        test_agreements=tests,
    )
