"""The student: a timm backbone plus a projection head onto the teacher's embedding space.

Its layout (``trunk`` + ``head.proj`` or ``head.mlp``) is exactly open_clip's ``TimmModel``, so
the export stage can hand a student to open_clip as a timm image tower without renaming.
A student folder holds ``model.safetensors`` and ``config.json``: everything needed to rebuild it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_path, atomic_write_json, make_readable, read_json
from synthdistill.teacher import Preprocessing
from synthdistill.tiny import TINY_IMAGE_SIZE, TINY_STUDENT_TIMM_NAME, is_tiny

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_WEIGHTS_NAME = "weights.safetensors"  # a training checkpoint: student and loss state
CHECKPOINT_STUDENT_PREFIX = "student."


@dataclass
class StudentConfig:
    """What a student folder records besides its weights."""

    timm_name: str
    embed_dim: int
    head: str = "linear"
    preprocessing: Preprocessing | None = None
    head_bias: bool = False  # the head's last linear layer has a bias (the authors'; open_clip: none)
    teacher: str | None = None
    teacher_pretrained: str | None = None
    format_version: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> StudentConfig:
        data = dict(data)
        if data.get("preprocessing"):
            p = data["preprocessing"]
            data["preprocessing"] = Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def timm_name_for(student: str) -> str:
    """'tiny' -> timm's tiny test model; any other name must be a timm model."""
    import timm

    name = TINY_STUDENT_TIMM_NAME if is_tiny(student) else student
    if name not in timm.list_models() and name not in timm.list_pretrained():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise SynthdistillError(f"Unknown timm model '{student}'.{hint} Or use 'tiny' for a tiny test model.")
    return name


@dataclass(frozen=True)
class TimmWeights:
    """Where a new student's trunk weights come from: timm's ``model_name`` ('arch.tag', from the
    Hugging Face cache or hub) or, with ``file``, a local weights file for that architecture."""

    model_name: str
    file: str | None = None


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def resolve_timm_weights(timm_name: str, pretrained: bool | str) -> TimmWeights | None:
    """``distill.student_pretrained`` -> the weights to start from, checked without any download.

    ``False``: none (random init); ``True``: timm's default tag; a tag of the student's architecture
    ('dist_in22k' or 'tiny_vit_11m_224.dist_in22k'); or a local weights file.
    """
    import timm
    from timm.models import split_model_name_tag

    if pretrained is False:
        return None
    architecture, own_tag = split_model_name_tag(timm_name)
    known = timm.list_pretrained(f"{architecture}.*")
    if pretrained is True:
        if not known:
            raise SynthdistillError(
                f"timm has no pretrained weights for '{architecture}'; set distill.student_pretrained=false "
                "or pass a local weights file."
            )
        return TimmWeights(timm_name)
    if Path(pretrained).is_file():
        return TimmWeights(architecture, file=str(pretrained))
    if pretrained.endswith(_WEIGHT_SUFFIXES) or "/" in pretrained:
        raise SynthdistillError(
            f"The weights file '{pretrained}' (distill.student_pretrained) does not exist; pass an existing "
            "file, a timm tag of the student, true or false."
        )
    listed = ", ".join(known) or "none"
    head, _, tail = pretrained.partition(".")
    full = pretrained if tail and head in timm.list_models() else f"{architecture}.{pretrained}"
    if split_model_name_tag(full)[0] != architecture:
        raise SynthdistillError(
            f"distill.student_pretrained '{pretrained}' is a tag of '{head}', not of the student "
            f"'{architecture}'; pass one of its tags ({listed}) or change distill.student."
        )
    if full not in known:
        raise SynthdistillError(
            f"timm has no pretrained tag '{pretrained}' for '{architecture}' (known: {listed}); "
            "pass a known tag, true, false or a local weights file."
        )
    return TimmWeights(full)


def size_kwargs(timm_name: str, image_size: int | None) -> dict:
    """``img_size`` for the models whose size timm fixes at construction (ViTs: their position
    embeddings); convolutional nets and TinyViT (padded windows) take any size as built."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    if image_size is None or cfg is None or not getattr(cfg, "fixed_input_size", False):
        return {}
    return {"img_size": image_size}


def default_image_size(timm_name: str) -> int:
    """The input side timm's configuration gives the model."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    return int(cfg.input_size[-1]) if cfg is not None else 224


def check_image_size(name: str, timm_name: str, image_size: int) -> None:
    """Refuse an input size the architecture cannot take, by building it on the meta device (no
    memory, no weights) and running one image through; a model whose forward the meta device
    cannot run is tried once on the CPU."""
    import timm

    def forward(device: str) -> None:
        with torch.device(device), torch.no_grad():
            trunk = timm.create_model(
                timm_name, num_classes=0, global_pool="avg", **size_kwargs(timm_name, image_size)
            )
            trunk.eval()(torch.zeros(1, 3, image_size, image_size))

    try:
        forward("meta")
    except (AssertionError, RuntimeError, ValueError, TypeError, NotImplementedError):
        try:
            forward("cpu")
        except (AssertionError, RuntimeError, ValueError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SynthdistillError(
                f"Student '{name}' cannot take distill.image_size={image_size} (timm: {reason}); use its "
                f"size {default_image_size(timm_name)} (distill.image_size=null) or a student that takes "
                "other sizes (ViT, TinyViT, EfficientNet)."
            ) from None


def _offline_error(weights: TimmWeights) -> SynthdistillError:
    return SynthdistillError(
        f"The timm weights '{weights.model_name}' (distill.student_pretrained) are not in the local cache "
        "and cannot be downloaded (offline?); run once with network access, point HF_HUB_CACHE at a "
        "cache that holds them, or pass a local weights file as "
        "distill.student_pretrained=/path/model.safetensors."
    )


def create_trunk(timm_name: str, weights: TimmWeights | None, image_size: int | None) -> nn.Module:
    """timm's model without its classifier (average pooling), from ``weights`` or random."""
    import timm

    kwargs = {"num_classes": 0, "global_pool": "avg", **size_kwargs(timm_name, image_size)}
    if weights is None:
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if weights.file is not None:
        overlay = {"file": weights.file}
        return timm.create_model(
            weights.model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    try:
        return timm.create_model(weights.model_name, pretrained=True, **kwargs)
    except OSError:  # huggingface_hub's LocalEntryNotFoundError, connection errors
        raise _offline_error(weights) from None
    except RuntimeError as e:
        if "hub" in str(e).lower() or "download" in str(e).lower():
            raise _offline_error(weights) from None
        raise


class Student(nn.Module):
    """Image -> (B, D) L2-normalised embedding comparable with the teacher's image embeddings.

    ``weights`` (see :func:`resolve_timm_weights`) start the trunk from timm's weights; the trunk
    is built for ``config.preprocessing.image_size`` where timm fixes the size at construction.
    """

    def __init__(self, config: StudentConfig, weights: TimmWeights | None = None):
        super().__init__()
        from timm.layers import Mlp

        self.config = config
        image_size = config.preprocessing.image_size if config.preprocessing else None
        self.trunk = create_trunk(config.timm_name, weights, image_size)
        # what the trunk returns: after timm's pre-logits head layer where it has one (MobileNetV3)
        width = getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features
        if config.head == "linear":
            layers = OrderedDict(
                drop=nn.Dropout(0.0), proj=nn.Linear(width, config.embed_dim, bias=config.head_bias)
            )
        elif config.head == "mlp":
            layers = OrderedDict(
                mlp=Mlp(
                    width,
                    2 * config.embed_dim,
                    config.embed_dim,
                    drop=(0.0, 0.0),
                    bias=(True, config.head_bias),
                )
            )
        else:
            raise SynthdistillError(f"Unknown head '{config.head}'; use 'linear' or 'mlp'.")
        self.head = nn.Sequential(layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projected, not yet normalised."""
        return self.head(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_features(images), dim=-1)

    @property
    def preprocess(self) -> Callable:
        """PIL image -> (3, S, S) tensor as this student takes it: resized, centre-cropped and
        CLIP-normalised as its config.json records, like open_clip's ``preprocess_val``. (An exported
        ONNX model takes RGB in [0, 1] instead and normalises inside.)"""
        if self.config.preprocessing is None:
            raise SynthdistillError("This student records no preprocessing; save it again with save_student.")
        return self.config.preprocessing.eval_transform()


def student_config(
    name: str,
    embed_dim: int,
    head: str = "linear",
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
    teacher: str | None = None,
    teacher_pretrained: str | None = None,
    head_bias: bool = False,
) -> StudentConfig:
    """What :func:`create_student` builds, without building it.

    Preprocessing follows the teacher (CLIP's mean/std, so student and teacher see the same
    pixels) at the student's own input size: ``image_size``, else the timm model's default.
    """
    timm_name = timm_name_for(name)
    if image_size is None:
        image_size = TINY_IMAGE_SIZE if is_tiny(name) else default_image_size(timm_name)
    base = preprocessing or Preprocessing(
        image_size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    )
    return StudentConfig(
        timm_name=timm_name,
        embed_dim=embed_dim,
        head=head,
        preprocessing=dataclasses.replace(base, image_size=image_size),
        teacher=teacher,
        teacher_pretrained=teacher_pretrained,
        head_bias=head_bias,
    )


def check_student(
    name: str,
    embed_dim: int | None,
    head: str = "linear",
    pretrained: bool | str = False,
    image_size: int | None = None,
    init: str | Path | None = None,
    head_bias: bool = False,
) -> None:
    """Every student setting checked before any model loads (no weights read, no download): the
    timm name, the pretrained tag or file, the input size, and that ``init`` fits the student
    (its width ``embed_dim``, the teacher's; None: not known yet, checked at load)."""
    timm_name = timm_name_for(name)
    resolve_timm_weights(timm_name, pretrained)
    if image_size is not None and image_size != default_image_size(timm_name):
        check_image_size(name, timm_name, image_size)
    if init is not None:
        found = find_init_weights(init)
        if embed_dim is not None:
            with torch.device("meta"):
                config = student_config(name, embed_dim, head, image_size=image_size, head_bias=head_bias)
                shapes = Student(config).state_dict()
            check_init_fits(found, {k: tuple(v.shape) for k, v in shapes.items()}, timm_name, embed_dim, head)


def create_student(
    name: str,
    embed_dim: int,
    head: str = "linear",
    pretrained: bool | str = False,
    preprocessing: Preprocessing | None = None,
    image_size: int | None = None,
    teacher: str | None = None,
    teacher_pretrained: str | None = None,
    head_bias: bool = False,
) -> Student:
    """Build a student from a timm name (or 'tiny'): random, or with ``pretrained`` timm weights
    (True, a tag of its architecture, or a local file); ``head_bias`` puts a bias in the head's last
    linear layer (the authors' student; open_clip's timm tower holds it as ``timm_proj_bias``)."""
    config = student_config(
        name, embed_dim, head, preprocessing, image_size, teacher, teacher_pretrained, head_bias
    )
    weights = resolve_timm_weights(config.timm_name, pretrained)
    if image_size is not None and image_size != default_image_size(config.timm_name):
        check_image_size(name, config.timm_name, image_size)
    return Student(config, weights)


# ----------------------------------------------------------------------------- starting weights


@dataclass(frozen=True)
class InitWeights:
    """A student's starting weights on disk: ``weights_file``, whose keys under ``prefix`` are the
    student's, and the :class:`StudentConfig` that made them when the folder records one."""

    path: Path
    weights_file: Path
    prefix: str
    config: StudentConfig | None


def find_init_weights(path: str | Path) -> InitWeights:
    """``distill.init`` -> its weights: a student folder (model.safetensors + config.json), a
    checkpoint folder (step-N/ with weights.safetensors of student and loss), or a checkpoints/
    folder (its newest step-N)."""
    path = Path(path)
    what = (
        "pass a student folder (runs/<name>/student), a checkpoint folder (runs/<name>/checkpoints/step-N) "
        "or distill.init=null"
    )
    if not path.exists():
        raise SynthdistillError(f"distill.init '{path}' does not exist; {what}.")
    steps = sorted(path.glob("step-*")) if path.is_dir() else []
    if not (path / WEIGHTS_NAME).is_file() and not (path / CHECKPOINT_WEIGHTS_NAME).is_file() and steps:
        path = steps[-1]
    config_path = path / CONFIG_NAME
    try:
        config = StudentConfig.from_json(read_json(config_path)) if config_path.is_file() else None
    except (OSError, ValueError, TypeError) as e:
        raise SynthdistillError(f"distill.init: '{config_path}' cannot be read ({e}); {what}.") from None
    if (path / WEIGHTS_NAME).is_file():
        if config is None:
            raise SynthdistillError(
                f"distill.init '{path}' has no {CONFIG_NAME}: its training did not finish; {what}."
            )
        return InitWeights(path, path / WEIGHTS_NAME, "", config)
    if (path / CHECKPOINT_WEIGHTS_NAME).is_file():
        return InitWeights(path, path / CHECKPOINT_WEIGHTS_NAME, CHECKPOINT_STUDENT_PREFIX, config)
    raise SynthdistillError(
        f"distill.init '{path}' holds neither {WEIGHTS_NAME} nor {CHECKPOINT_WEIGHTS_NAME}; {what}."
    )


def _init_shapes(init: InitWeights) -> dict[str, tuple[int, ...]]:
    """The student's keys and shapes in ``init``'s file, from the safetensors header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(init.weights_file), framework="pt") as weights:
            return {
                key[len(init.prefix) :]: tuple(weights.get_slice(key).get_shape())
                for key in weights.keys()  # noqa: SIM118 (safe_open is no dict)
                if key.startswith(init.prefix)
            }
    except Exception as e:  # safetensors raises its own error type for a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SynthdistillError(
            f"distill.init: '{init.weights_file}' cannot be read ({reason}); "
            "pass an intact student or checkpoint folder."
        ) from None


def _width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    for key in ("head.proj.weight", "head.mlp.fc2.weight"):
        if key in shapes:
            return shapes[key][0]
    return None


def check_init_fits(
    init: InitWeights, expected: dict[str, tuple[int, ...]], timm_name: str, embed_dim: int, head: str
) -> None:
    """Refuse starting weights of another architecture, head or embedding width, naming both."""
    here = f"a '{timm_name}' student of width {embed_dim} ({head} head)"
    fix = "pass a matching distill.student (and teacher), or another distill.init"
    if init.config is not None and (init.config.timm_name, init.config.embed_dim, init.config.head) != (
        timm_name,
        embed_dim,
        head,
    ):
        raise SynthdistillError(
            f"distill.init '{init.path}' is a '{init.config.timm_name}' student of width "
            f"{init.config.embed_dim} ({init.config.head} head), but this run trains {here}; {fix}."
        )
    shapes = _init_shapes(init)
    there = f"its weights (width {_width(shapes)})"
    for key in sorted(set(expected) | set(shapes)):
        if key not in shapes:
            raise SynthdistillError(
                f"distill.init '{init.path}' does not fit {here}: {there} lack '{key}'; {fix}."
            )
        if key not in expected:
            raise SynthdistillError(
                f"distill.init '{init.path}' does not fit {here}: {there} have '{key}', this student "
                f"has not; {fix}."
            )
        if shapes[key] != expected[key]:
            raise SynthdistillError(
                f"distill.init '{init.path}' does not fit {here}: '{key}' is {list(shapes[key])} in "
                f"{there} and {list(expected[key])} here; {fix}."
            )


def init_identity(path: str | Path) -> str:
    """``distill.init``'s identity for the stage and checkpoint identities: the content of the weights
    file it resolves to (:func:`synthdistill.identity.weights_identity`), not its path."""
    from synthdistill.identity import weights_identity

    return weights_identity(str(find_init_weights(path).weights_file))


def load_init_weights(student: Student, path: str | Path) -> str:
    """Copy ``distill.init``'s weights (backbone and head) into ``student``; returns their content
    identity (:func:`init_identity`), for the stage identity.

    Refuses, in one sentence naming both, weights of another architecture or embedding width.
    """
    from safetensors.torch import load_file

    init = find_init_weights(path)
    own = student.state_dict()
    expected = {key: tuple(value.shape) for key, value in own.items()}
    config = student.config
    check_init_fits(init, expected, config.timm_name, config.embed_dim, config.head)
    state = load_file(str(init.weights_file))
    student.load_state_dict(
        {key[len(init.prefix) :]: v for key, v in state.items() if key.startswith(init.prefix)}
    )
    return init_identity(init.path)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` for weight matrices and kernels; none for biases,
    norms, the temperature (1-D and 0-D tensors) and what timm models exclude by name
    (``no_weight_decay()``, ``no_weight_decay_keywords()``: TinyViT's attention_biases, ViTs'
    pos_embed and cls_token), found in any submodule. Frozen parameters are left out."""
    excluded: set[str] = set()
    for prefix, sub in module.named_modules():
        names = sub.no_weight_decay() if callable(getattr(sub, "no_weight_decay", None)) else ()
        keywords = (
            sub.no_weight_decay_keywords() if callable(getattr(sub, "no_weight_decay_keywords", None)) else ()
        )
        for name, _ in sub.named_parameters():
            if name in names or any(keyword in name for keyword in keywords):
                excluded.add(f"{prefix}.{name}" if prefix else name)
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            skip = parameter.ndim <= 1 or name.endswith(".bias") or name in excluded
            (no_decay if skip else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def save_student(student: Student, directory: str | Path) -> Path:
    """Write weights then config, each atomically; config.json last, so its presence means complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "synthdistill": "student"})
        make_readable([tmp])
    atomic_write_json(directory / CONFIG_NAME, student.config.to_json())
    return directory


def load_student(directory: str | Path, device: str | torch.device = "cpu") -> Student:
    """A student folder -> the model in eval mode, ready for inference."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise SynthdistillError(
                f"'{directory}' is not a student folder: '{path.name}' is missing "
                "(train one with `synthdistill distill`)."
            )
    config = StudentConfig.from_json(read_json(config_path))
    student = Student(config)
    student.load_state_dict(load_file(str(weights_path)))
    return student.to(device).eval()
