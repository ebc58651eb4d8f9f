"""Stage 3: distil the teacher's image encoder into a small student on the synthetic shards.

``distill`` reads top to bottom: shards, models, teacher cache, optimizer, resume, then one loop
over steps. The data come from one small interface, :class:`ShardViewSource` (``steps_per_epoch``
and ``loader(epoch, first_batch)``): replayable augmented views, this rank's share, resumable at
any batch. With the cache on, epoch e trains on view e mod K with the teacher's stored features;
without it the teacher embeds view e in the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from synthdistill.augment import Augmentation, Batch, ViewDataset, view_loader
from synthdistill.config import DistillConfig, config_hash
from synthdistill.errors import SynthdistillError
from synthdistill.losses import LossSettings, WeightedLoss
from synthdistill.registry import Domain
from synthdistill.runtime import (
    DistEnv,
    autocast,
    barrier,
    derive_seed,
    dist_env,
    init_distributed,
    resolve_device,
)
from synthdistill.shards import ShardSamples, list_shards
from synthdistill.student import CONFIG_NAME, Student, create_student, save_student
from synthdistill.teacher import Teacher, load_teacher
from synthdistill.teacher_cache import open_or_build_cache, shards_fingerprint, teacher_features

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
# Settings that do not change the optimisation problem, so a checkpoint resumes across them.
NOT_IN_RUN_HASH = ("workers", "log_every", "checkpoint_every", "compile")


@dataclass
class DistillSummary:
    """What a distillation call did; ``student_dir`` is None when it stopped before the end."""

    student_dir: str | None
    steps: int
    total_steps: int
    epochs: int
    samples: int  # in the shards
    final_loss: float | None
    final_cosine: float | None
    images_per_second: float
    corrupt_keys: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None
    teacher_cache: str | None = None
    cache_seconds: float = 0.0  # opening or building the teacher cache

    @property
    def completed(self) -> bool:
        return self.student_dir is not None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "corrupt_images": len(self.corrupt_keys)}


def open_shards(shards_dir: str | Path) -> ShardSamples:
    """The shards of a folder, refused with a clear sentence when missing or empty."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise SynthdistillError(
            f"Shards folder '{shards_dir}' does not exist; generate images first (`synthdistill generate`) "
            "or pass --shards."
        )
    shards = list_shards(shards_dir)
    if not shards:
        raise SynthdistillError(
            f"Shards folder '{shards_dir}' holds no shard-*.tar files; generate images first "
            "(`synthdistill generate`)."
        )
    samples = ShardSamples(shards)
    if len(samples) == 0:
        raise SynthdistillError(f"The shards in '{shards_dir}' hold no images; regenerate them.")
    return samples


def class_text_embeddings(teacher: Teacher, domain: Domain | None, samples: ShardSamples) -> torch.Tensor:
    """(C, D) teacher text embeddings of the class prompts (CLIP's template ensemble), for vl/mpc.

    Also checks that the shards were made for these classes (their ``class_name`` metadata).
    """
    if domain is None:
        raise SynthdistillError("Losses vl and mpc need the class names: pass --dataset or --classes.")
    meta = samples[0].meta
    index, name = meta.get("class_index"), meta.get("class_name")
    if (
        index is not None
        and name is not None
        and (index >= domain.num_classes or domain.classnames[index] != name)
    ):
        raise SynthdistillError(
            f"The shards were made for other classes (sample '{samples.key(0)}' is '{name}', class {index}) "
            f"than '{domain.name}'; pass the dataset or class file they were generated from."
        )
    return teacher.build_zero_shot_head(domain.classnames, domain.templates).T.contiguous()


class Distiller(nn.Module):
    """Student and loss as one module, so DDP also syncs a learnable temperature's gradient."""

    def __init__(self, student: Student, loss: WeightedLoss, class_text: torch.Tensor | None):
        super().__init__()
        self.student, self.loss = student, loss
        self.register_buffer("class_text", class_text, persistent=False)

    def forward(
        self, images: torch.Tensor, teacher_features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss, (B, D) fp32 student features). The loss is computed in fp32."""
        student_features = self.student.forward_features(images).float()
        with torch.autocast(images.device.type, enabled=False):
            loss = self.loss(student_features, teacher_features, labels, self.class_text)
        return loss, student_features


@dataclass
class ShardViewSource:
    """The map-style data source: a seeded permutation per epoch, split across ranks like
    DistributedSampler (padded so every rank takes the same number of steps), in batches of
    (sample index, view index). The incomplete last batch is dropped when there is a full one."""

    dataset: ViewDataset
    local_batch: int
    seed: int
    views: int | None  # K with the teacher cache (view = epoch mod K); None: a fresh view each epoch
    env: DistEnv
    workers: int = 0
    pin_memory: bool = False

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.env.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.per_rank // self.local_batch)

    def loader(
        self, epoch: int, first_batch: int = 0, end_batch: int | None = None
    ) -> torch.utils.data.DataLoader:
        """Batches ``first_batch`` to ``end_batch`` (exclusive) of ``epoch``: a resume starts mid-epoch."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padded = (order * self.env.world_size)[: self.per_rank * self.env.world_size]
        mine = padded[self.env.rank :: self.env.world_size]
        view = epoch % self.views if self.views else epoch
        batches = [
            [(index, view) for index in mine[b * self.local_batch : (b + 1) * self.local_batch]]
            for b in range(first_batch, self.steps_per_epoch if end_batch is None else end_batch)
        ]
        return view_loader(self.dataset, batches, self.workers, self.pin_memory)


def train_batches(data: ShardViewSource, start: int, end: int) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) for the global steps ``start`` to ``end`` (exclusive)."""
    per_epoch = data.steps_per_epoch
    for epoch in range(start // per_epoch, math.ceil(end / per_epoch)):
        first, last = max(start - epoch * per_epoch, 0), min(end - epoch * per_epoch, per_epoch)
        for batch in data.loader(epoch, first, last):
            yield epoch, batch


def make_optimizer(module: nn.Module, config: DistillConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; as in CLIP training, biases, norms and the temperature (1-D tensors) get no weight decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=device.type == "cuda")


def lr_factor(step: int, config: DistillConfig, total_steps: int) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class Checkpoints:
    """``step-NNNNNNNN/`` folders (weights.safetensors + state.pt); the newest is the resume point.

    A folder is written under a hidden name and renamed when complete; older ones are then removed.
    """

    def __init__(self, directory: Path, run_hash: str):
        self.directory, self.run_hash = Path(directory), run_hash

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("step-*")) if self.directory.is_dir() else []
        return found[-1] if found else None

    def clear(self) -> None:
        for path in self.directory.glob("step-*") if self.directory.is_dir() else []:
            shutil.rmtree(path)

    def save(self, step: int, distiller: Distiller, optimizer, scheduler, state: dict) -> Path:
        from safetensors.torch import save_file

        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()}
        save_file(weights, str(tmp / "weights.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {
                **state,
                "step": step,
                "run_hash": self.run_hash,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
            },
            tmp / "state.pt",
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for older in self.directory.glob("step-*"):
            if older != final:
                shutil.rmtree(older)
        return final

    def load(self, path: Path, distiller: Distiller, optimizer, scheduler, device: torch.device) -> dict:
        """Restore weights, optimizer and scheduler; return the saved state (step, rng, ...)."""
        from safetensors.torch import load_file

        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if state["run_hash"] != self.run_hash:
            raise SynthdistillError(
                f"The checkpoint '{path}' was made under another config, other shards or another number of "
                "processes; rerun with --no-resume to start over, or choose another --out."
            )
        distiller.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class TrainLog:
    """``train_log.jsonl`` (and TensorBoard when installed), written by rank 0.

    Sums loss, cosine and images between log lines on every rank; a line averages them over ranks.
    """

    def __init__(self, path: Path, env: DistEnv, device: torch.device, fresh: bool, corrupt_keys: list[str]):
        self.env, self.path = env, path
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, cosine, n
        self.corrupt_keys = list(corrupt_keys)  # every rank's, as of the last line
        self.unlogged_corrupt: list[str] = []  # this rank's since then
        self.started = time.perf_counter()
        self.last: dict = {}
        self.images = 0  # trained on, all ranks
        self.tensorboard = None
        if env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                path.unlink(missing_ok=True)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def event(self, **record) -> None:
        if self.env.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def add(self, batch: Batch, loss: torch.Tensor, cosine_sum: torch.Tensor) -> None:
        self.sums[0] += loss.detach() * len(batch)
        self.sums[1] += cosine_sum.detach()
        self.sums[2] += len(batch)
        self.unlogged_corrupt += batch.corrupt_keys

    def write(self, step: int, epoch: int, lr: float) -> dict:
        """One line: the averages since the last one, and the corrupt images met since (named once)."""
        for key in gather_keys(self.unlogged_corrupt, self.env):
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
                logger.warning("skipped sample '%s': its image does not decode", key)
                self.event(event="corrupt_image", step=step, key=key)
        self.unlogged_corrupt = []
        if self.env.is_distributed:
            torch.distributed.all_reduce(self.sums)
        loss_sum, cosine_sum, count = self.sums.tolist()
        self.last = {
            "step": step,
            "epoch": epoch,
            "loss": loss_sum / count,
            "lr": lr,
            "images_per_s": count / (time.perf_counter() - self.started),
            "cosine": cosine_sum / count,
        }
        self.event(**self.last)
        if self.tensorboard is not None:
            for name in ("loss", "lr", "images_per_s", "cosine"):
                self.tensorboard.add_scalar(f"train/{name}", self.last[name], step)
        self.images += int(count)
        self.sums.zero_()
        self.started = time.perf_counter()
        return self.last

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def gather_keys(keys: list[str], env: DistEnv) -> list[str]:
    """Every rank's keys, on every rank."""
    if not env.is_distributed:
        return keys
    gathered: list[list[str]] = [[] for _ in range(env.world_size)]
    torch.distributed.all_gather_object(gathered, keys)
    return [key for rank_keys in gathered for key in rank_keys]


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the call (unless a caller, e.g. the pipeline, already did)."""
    owned = env.is_distributed and not torch.distributed.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(env, device)
    try:
        yield
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def non_finite_error(
    loss: float, step: int, epoch: int, batch: Batch, checkpoint: Path | None
) -> SynthdistillError:
    shown = ", ".join(batch.keys[:16]) + (f" and {len(batch.keys) - 16} more" if len(batch.keys) > 16 else "")
    kept = f"the last good checkpoint is '{checkpoint}'" if checkpoint else "no checkpoint was written yet"
    return SynthdistillError(
        f"The loss became {loss} at step {step} (epoch {epoch}) on samples {shown}; {kept}: lower "
        "distill.lr or check those images, then rerun to resume."
    )


def build_student(config: DistillConfig, teacher: Teacher, seed: int) -> Student:
    """The student with its projection head to the teacher's width; the same init on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "student"))
        return create_student(
            config.student,
            teacher.embed_dim,
            head=config.head,
            pretrained=config.student_pretrained,
            preprocessing=teacher.preprocessing,
            image_size=config.image_size,
            teacher=config.teacher,
            teacher_pretrained=config.teacher_pretrained,
        )


def run_hash(config: DistillConfig, seed: int, shards_id: str, world_size: int) -> str:
    """What a checkpoint must share with this call to be resumed: the settings that change training."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_RUN_HASH}
    return config_hash(settings, seed, shards_id, world_size)


def check_batch(batch: Batch, step: int, num_classes: int | None) -> None:
    """Refuse a batch with no decodable image, or (for vl/mpc) a sample without a class of the domain."""
    if not len(batch):
        raise SynthdistillError(
            f"No image of the batch at step {step} decodes ({', '.join(batch.corrupt_keys[:8])}, ...): "
            "the shards look damaged; regenerate them."
        )
    if num_classes is not None and not bool(((batch.labels >= 0) & (batch.labels < num_classes)).all()):
        bad = batch.keys[int(((batch.labels < 0) | (batch.labels >= num_classes)).int().argmax())]
        raise SynthdistillError(
            f"Sample '{bad}' has no class index of this domain; vl and mpc need shards made for its classes."
        )


def distill(
    shards_dir: Path,
    out_dir: Path,
    config: DistillConfig,
    *,
    domain: Domain | None = None,
    seed: int = 0,
    device: str = "auto",
    checkpoint_dir: Path | None = None,
    cache_dir: Path | None = None,
    stop_after_steps: int | None = None,
    resume: bool = True,
) -> DistillSummary:
    """Train a student to reproduce the teacher's image embeddings on the shards in ``shards_dir``.

    Writes ``out_dir/train_log.jsonl`` during training and the student (``model.safetensors``,
    then ``config.json``) at the end. Checkpoints go to ``checkpoint_dir`` (default
    ``out_dir/../checkpoints``) and a run under the same settings resumes from the newest one
    unless ``resume=False``. ``stop_after_steps`` ends the call early after a checkpoint at that
    step (a planned interruption). Under torchrun every rank calls this; only rank 0 writes.
    """
    env = dist_env()
    device = resolve_device(device, env)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "checkpoints"
    cache_dir = Path(cache_dir) if cache_dir else Path(shards_dir).parent / "teacher_cache"
    with process_group(env, device):
        samples = open_shards(shards_dir)
        if config.batch_size % env.world_size:
            raise SynthdistillError(
                f"distill.batch_size ({config.batch_size}) must be a multiple of the number of "
                f"processes ({env.world_size})."
            )

        # Models: the frozen teacher, the student, the loss (vl/mpc also need the class texts).
        teacher = load_teacher(config.teacher, config.teacher_pretrained, device)
        student = build_student(config, teacher, seed)
        loss = WeightedLoss(
            config.loss, LossSettings(config.fd_variant, teacher.logit_scale, config.learnable_temperature)
        )
        class_text = class_text_embeddings(teacher, domain, samples) if loss.needs_text else None
        distiller = Distiller(student, loss, class_text).to(device)

        # Data: replayable views; the teacher's features from the cache, or from the teacher in the loop.
        augmentation = Augmentation(seed, config.aug_scale_min)
        shards_id = shards_fingerprint(samples.shards)
        inputs = [student.config.preprocessing]
        cache, cache_started = None, time.perf_counter()
        if config.cache_teacher:
            teacher_views = ViewDataset(samples, augmentation, [teacher.preprocessing])
            cache = open_or_build_cache(
                cache_dir,
                teacher,
                teacher_views,
                config.cache_views,
                config.precision,
                shards_id,
                env=env,
                batch_size=config.batch_size // env.world_size,
                workers=config.workers,
                dtype=config.cache_dtype,
            )
            teacher = None  # its work is done: free its memory
        elif teacher.preprocessing != inputs[0]:
            inputs.append(teacher.preprocessing)  # the teacher sees the same crop at its own size
        cache_seconds = time.perf_counter() - cache_started
        data = ShardViewSource(
            ViewDataset(samples, augmentation, inputs),
            local_batch=config.batch_size // env.world_size,
            seed=seed,
            views=cache.views if cache else None,
            env=env,
            workers=config.workers,
            pin_memory=device.type == "cuda",
        )
        total_steps = config.epochs * data.steps_per_epoch
        end_step = min(total_steps, stop_after_steps) if stop_after_steps is not None else total_steps

        # Optimizer and schedule, restored from the newest checkpoint of this same run if there is one.
        optimizer = make_optimizer(distiller, config, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
        checkpoints = Checkpoints(checkpoint_dir, run_hash(config, seed, shards_id, env.world_size))
        latest = checkpoints.latest() if resume else None
        state = checkpoints.load(latest, distiller, optimizer, scheduler, device) if latest else {}
        step = start_step = state.get("step", 0)
        if env.is_main:
            if not latest:
                checkpoints.clear()
            (out_dir / CONFIG_NAME).unlink(missing_ok=True)  # the folder must not look finished
        if latest and env.is_main:
            restore_rng(state["rng"])
        else:
            torch.manual_seed(derive_seed(seed, "train", env.rank, step))
        model = distiller
        if env.is_distributed:
            model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            model = torch.compile(model)
        log = TrainLog(
            out_dir / LOG_NAME, env, device, fresh=not latest, corrupt_keys=state.get("corrupt_keys", [])
        )
        log.event(event="start", step=step, total_steps=total_steps, world_size=env.world_size)

        # The loop: one optimisation step per batch.
        distiller.train()
        progress = tqdm(total=total_steps, initial=step, unit="step", disable=None if env.is_main else True)
        started = time.perf_counter()
        for epoch, batch in train_batches(data, start_step, end_step):
            check_batch(batch, step + 1, len(class_text) if loss.needs_text else None)
            images = batch.inputs[0].to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
            if cache is not None:
                targets = cache.lookup(batch.views, batch.indices).to(device, non_blocking=True)
            else:
                targets = teacher_features(teacher, batch.inputs[-1], config.precision)

            with autocast(device, config.precision):
                batch_loss, student_features = model(images, targets, labels)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(distiller.parameters(), config.grad_clip or math.inf)
            if not bool(torch.isfinite(batch_loss.detach()) & torch.isfinite(grad_norm)):
                log.event(event="non_finite_loss", step=step + 1, keys=batch.keys)
                raise non_finite_error(batch_loss.item(), step + 1, epoch, batch, checkpoints.latest())
            optimizer.step()
            scheduler.step()
            step += 1

            log.add(batch, batch_loss, F.cosine_similarity(student_features.detach(), targets, dim=-1).sum())
            checkpoint_now = step % config.checkpoint_every == 0 or step == end_step
            if checkpoint_now or step % config.log_every == 0:
                line = log.write(step, epoch, scheduler.get_last_lr()[0])
                progress.set_postfix(
                    loss=f"{line['loss']:.4f}",
                    cos=f"{line['cosine']:.4f}",
                    img_s=f"{line['images_per_s']:.0f}",
                )
            progress.update()
            if checkpoint_now and env.is_main:
                position = {"epoch": epoch, "batch": step - epoch * data.steps_per_epoch}
                checkpoints.save(
                    step, distiller, optimizer, scheduler, {**position, "corrupt_keys": log.corrupt_keys}
                )
        progress.close()
        elapsed = time.perf_counter() - started

        finished = step == total_steps
        if finished and env.is_main:
            save_student(student, out_dir)  # config.json last: its presence means complete
        log.event(event="end" if finished else "stopped", step=step)
        log.close()
        barrier(env)
        return DistillSummary(
            student_dir=str(out_dir) if finished else None,
            steps=step,
            total_steps=total_steps,
            epochs=config.epochs,
            samples=len(samples),
            final_loss=log.last.get("loss"),
            final_cosine=log.last.get("cosine"),
            images_per_second=log.images / elapsed if step > start_step else 0.0,
            corrupt_keys=log.corrupt_keys,
            resumed_from_step=start_step if latest else None,
            teacher_cache=str(cache.path) if cache else None,
            cache_seconds=cache_seconds,
        )
