"""Stage 3: distil the teacher's image encoder into a small student.

:func:`distill_student` reads top to bottom: models, data, optimiser, resume, then one loop over
steps. The loop sees one small interface, :class:`~synthdistill.train.sources.TrainData`, behind
which sit the run's shards (decoded once, or decoded by workers) and streamed ``train_data``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthdistill import identity
from synthdistill.config import DistillConfig
from synthdistill.data.augment import Augmentation
from synthdistill.data.decoded import open_or_build_decoded
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import remove_stale_temporaries
from synthdistill.losses import BatchGroup, LossSettings, WeightedLoss
from synthdistill.progress import progress_bar
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
from synthdistill.student import (
    CONFIG_NAME,
    Student,
    check_student,
    create_student,
    load_init_weights,
    save_student,
)
from synthdistill.teacher import Teacher, load_teacher, teacher_embed_dim
from synthdistill.train.checkpoint import Checkpoints, gather_rng_states, seed_rng, set_rng_state
from synthdistill.train.log import LOG_NAME, NonFinite, TrainLog
from synthdistill.train.optim import lr_factor, make_grad_scaler, make_optimizer
from synthdistill.train.sources import (
    DecodedBatches,
    ShardTrainData,
    ShardViewSource,
    TrainData,
    TrainStep,
    WorkerImages,
    class_text_embeddings,
    open_shards,
    open_stream_data,
)
from synthdistill.train.teacher_cache import open_or_build_cache
from synthdistill.train.validate import (
    EpochEnd,
    ValidationData,
    best_epoch,
    check_init_exists,
    read_validation,
)

logger = logging.getLogger(__name__)

__all__ = ["LOG_NAME", "DistillSummary", "distill_student"]


@dataclass
class DistillSummary:
    """What a distillation call did; ``student_dir`` is None when it stopped before the end."""

    student_dir: str | None
    steps: int
    total_steps: int
    epochs: int
    samples: int | None  # per epoch: in the shards, or train_num_samples of streamed data
    final_loss: float | None
    final_cosine: float | None
    images_per_second: float
    corrupt_keys: list[str] = field(default_factory=list)
    resumed_from_step: int | None = None
    teacher_cache: str | None = None
    cache_seconds: float = 0.0  # opening or building the teacher cache
    train_data: str | None = None  # streamed data instead of the run's shards
    corrupt_samples: int = 0  # streamed data: samples skipped as undecodable (all ranks, epochs of this call)
    failed_shards: int = 0  # streamed data: shards that could not be read (all ranks, epochs of this call)
    input: str | None = None  # how the images reached the device: decoded, workers, stream(-device-decode)
    best_epoch: int | None = None  # by validation top-1 (mean over the test sets), all calls of the run
    best_top1: float | None = None
    best_checkpoint: str | None = None  # checkpoints/epoch-E of the best epoch, when kept

    @property
    def completed(self) -> bool:
        return self.student_dir is not None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "corrupt_images": len(self.corrupt_keys)}


class Distiller(nn.Module):
    """Student and loss as one module, so DDP also syncs a learnable temperature's gradient."""

    def __init__(self, student: Student, loss: WeightedLoss, class_text: torch.Tensor | None):
        super().__init__()
        self.student, self.loss = student, loss
        self.register_buffer("class_text", class_text, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        teacher_features: torch.Tensor,
        labels: torch.Tensor | None,
        texts: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss, (B, D) fp32 student features). The loss is computed in fp32.

        ``texts`` (C, D), the batch's caption embeddings, replace the class texts for vl/mpc;
        ``labels`` index the texts of either kind; ``text_ids`` (B,) say which images share a
        caption across ranks (see :func:`~synthdistill.losses.caption_ids`).
        """
        student_features = self.student.forward_features(images).float()
        with torch.autocast(images.device.type, enabled=False):
            class_text = self.class_text if texts is None else texts
            loss = self.loss(student_features, teacher_features, labels, class_text, text_ids=text_ids)
        return loss, student_features


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


def non_finite_error(failure: NonFinite, epoch: int, checkpoint: Path | None) -> SynthdistillError:
    keys = failure.keys
    shown = ", ".join(keys[:16]) + (f" and {len(keys) - 16} more" if len(keys) > 16 else "")
    kept = f"the last good checkpoint is '{checkpoint}'" if checkpoint else "no checkpoint was written yet"
    return SynthdistillError(
        f"The loss became {failure.loss} at step {failure.step} (epoch {epoch}) on samples {shown}; {kept}: "
        "lower distill.lr or check those images, then rerun to resume."
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
            head_bias=config.head_bias,
        )


def input_layout(student: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for a convolutional student on a GPU (cuDNN's fast layout), else as is."""
    convolutional = any(isinstance(m, nn.Conv2d) for m in student.modules())
    return torch.channels_last if device.type == "cuda" and convolutional else torch.contiguous_format


def train_steps(
    data: TrainData,
    epochs: int,
    log: TrainLog,
    step: int,
    stop_step: int | None,
    epoch_end: Callable[[int, int], None],
) -> Iterator[tuple[int, int, TrainStep]]:
    """(step number, epoch, batch) from where ``data`` stands to the end of ``epochs``, or up to step
    ``stop_step``; logs the data counters of every epoch it finishes, then calls ``epoch_end(epoch,
    step)`` (validation, kept checkpoints) after its last step. Nothing is drawn past a stop."""
    if stop_step is not None and step >= stop_step:
        return
    for epoch in range(data.start_epoch, epochs):
        for batch in data.epoch(epoch):
            step += 1
            yield step, epoch, batch
            if step == stop_step:
                return
        log.epoch_end(epoch, step, data.epoch_stats())
        epoch_end(epoch, step)


def open_shard_data(
    config: DistillConfig,
    samples,
    shards_dir: Path,
    shards_id: str,
    cache_dir: Path | None,
    teacher: Teacher,
    student: Student,
    num_classes: int | None,
    seed: int,
    env: DistEnv,
    device: torch.device,
) -> ShardTrainData:
    """The run's shards as training data: the images decoded once (or by workers), their replayable
    views, and the teacher's features from the cache (built here when missing) or the live teacher.
    ``shards_id`` is the shards' :func:`~synthdistill.identity.shards_folder_identity`."""
    if config.input == "workers":
        images = WorkerImages(samples, config.workers, pin_memory=device.type == "cuda")
    else:
        store = open_or_build_decoded(Path(shards_dir).parent / "decoded", samples, shards_id, env)
        store.to_device(device)
        images = DecodedBatches(store)
    augmentation = Augmentation(
        seed, tuple(config.aug_scale), tuple(config.aug_ratio), config.aug_interpolation, config.aug_hflip
    )
    local_batch = config.batch_size // env.world_size
    cache = None
    inputs = [student.config.preprocessing]
    if config.cache_teacher:
        cache = open_or_build_cache(
            Path(cache_dir) if cache_dir else Path(shards_dir).parent / "teacher_cache",
            teacher,
            images,
            len(samples),
            augmentation,
            config.cache_views,
            config.precision,
            shards_id,
            env=env,
            batch_size=local_batch,
            dtype=config.cache_dtype,
        )
        teacher = None  # its work is done
    elif teacher.preprocessing != inputs[0]:
        inputs.append(teacher.preprocessing)  # the teacher sees the same crop at its own size
    order = ShardViewSource(len(samples), local_batch, seed, cache.views if cache else None, env)
    return ShardTrainData(
        order,
        images,
        augmentation,
        inputs,
        f"{shards_id} on {env.world_size} processes",  # the views are split by rank
        device,
        config.precision,
        cache=cache,
        teacher=teacher,
        num_classes=num_classes,
    )


def distill_student(
    shards_dir: Path | None,
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
    validation: ValidationData | None = None,
) -> DistillSummary:
    """Train a student to reproduce the teacher's image embeddings on the shards in ``shards_dir``,
    or, when ``config.train_data`` is set, on that streamed data (``shards_dir`` is then unused).

    Writes ``out_dir/train_log.jsonl`` during training and the student (``model.safetensors``,
    then ``config.json``) at the end. Checkpoints go to ``checkpoint_dir`` (default
    ``out_dir/../checkpoints``) and a run under the same settings resumes from the newest one
    unless ``resume=False``. ``stop_after_steps`` ends the call early after a checkpoint at that
    step (a planned interruption). ``validation`` names the real test sets validated on with
    ``config.validate_every``. Under torchrun every rank calls this; only rank 0 writes.
    """
    check_init_exists(config.init)
    env = dist_env()
    device = resolve_device(device, env)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out_dir.parent / "checkpoints"
    with process_group(env, device):
        if device.type == "cuda":  # fp32 training in TF32 matmuls and convolutions, as the authors
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
        if config.batch_size % env.world_size:
            raise SynthdistillError(
                f"distill.batch_size ({config.batch_size}) must be a multiple of the number of "
                f"processes ({env.world_size})."
            )
        check_student(
            config.student,
            teacher_embed_dim(config.teacher),
            config.head,
            config.student_pretrained,
            config.image_size,
            config.init,
        )
        samples = None if config.train_data else open_shards(shards_dir)
        if env.is_main:  # what killed writers left, before anything is resumed or written
            remove_stale_temporaries(checkpoint_dir)
            remove_stale_temporaries(out_dir)

        # Models: the frozen teacher, the student (seeded, then its starting weights), the loss
        # (vl/mpc on shards also need the class texts).
        teacher = load_teacher(config.teacher, config.teacher_pretrained, device)
        student = build_student(config, teacher, seed)
        init_id = load_init_weights(student, config.init) if config.init is not None else None
        logit_scale = config.logit_scale if config.logit_scale is not None else teacher.logit_scale
        loss = WeightedLoss(
            config.loss,
            LossSettings(config.fd_variant, logit_scale, config.learnable_temperature),
            BatchGroup(env.rank, env.world_size),
        )
        needs_class_text = samples is not None and loss.needs_text
        class_text = class_text_embeddings(teacher, domain, samples) if needs_class_text else None
        distiller = Distiller(student, loss, class_text).to(device)
        layout = input_layout(student, device)
        distiller.to(memory_format=layout)

        # Data: streamed train_data with the teacher in the loop, or replayable views of the shards
        # with the teacher's features from the cache or from the teacher in the loop.
        cache_started = time.perf_counter()
        if config.train_data:
            data: TrainData = open_stream_data(config, teacher, student, loss.needs_text, seed, env, device)
            data_identity = config.train_data
        else:
            classes = len(class_text) if class_text is not None else None
            data_identity = identity.shards_folder_identity(shards_dir)
            data = open_shard_data(
                config,
                samples,
                shards_dir,
                data_identity,
                cache_dir,
                teacher,
                student,
                classes,
                seed,
                env,
                device,
            )
        cache = getattr(data, "cache", None)
        cache_seconds = time.perf_counter() - cache_started
        total_steps = config.epochs * data.steps_per_epoch

        # Optimiser, schedule, gradient scaler (fp16) and data position, restored from the newest
        # checkpoint of this same run, with every rank's random state.
        optimizer = make_optimizer(
            distiller, config.lr, config.weight_decay, config.betas, config.eps, device
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))
        scaler = make_grad_scaler(device, config.precision)
        student_id = identity.student_identity(data_identity, config, seed, device.type, init_id)
        checkpoints = Checkpoints(checkpoint_dir, identity.checkpoint_identity(student_id, data.identity))
        latest = checkpoints.latest() if resume else None
        state = checkpoints.load(latest, distiller, optimizer, scheduler, scaler, device) if latest else {}
        if latest:
            data.load_state_dict(state["data"])
        step = start_step = saved_step = state.get("step", 0)
        if env.is_main:
            if not latest:
                checkpoints.clear()
            (out_dir / CONFIG_NAME).unlink(missing_ok=True)  # the folder must not look finished
        saved_rng = state.get("rng", [])
        if len(saved_rng) == env.world_size:
            set_rng_state(saved_rng[env.rank], device)
        else:  # a fresh start, or streamed data resumed on another number of processes
            seed_rng(derive_seed(seed, "train", env.rank, step))
        model = distiller
        if env.is_distributed:
            model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            model = torch.compile(model)
        log = TrainLog(
            out_dir / LOG_NAME,
            env,
            device,
            resumed_step=start_step if latest else None,
            corrupt_keys=state.get("corrupt_keys", []),
        )
        log.event(
            event="start",
            step=step,
            total_steps=total_steps,
            world_size=env.world_size,
            train_data=config.train_data,
            input=data.input,
            teacher=f"cache of {cache.views} views" if cache else "live",
            resumed_from=str(latest) if latest else None,
        )
        logger.info("input pipeline: %s", data.input)

        epoch_end = EpochEnd(
            student=student,
            teacher=teacher,
            data=validation,
            protocol=config.validate_protocol,
            every=config.validate_every,
            keep=config.keep_checkpoints,
            epochs=config.epochs,
            start_epoch=data.start_epoch,
            checkpoint_dir=checkpoint_dir,
            log_event=log.event,
            env=env,
            device=device,
            log_path=out_dir / LOG_NAME,
            step=step,
            resumed_from=latest,
            save=functools.partial(
                save_checkpoint,
                data=data,
                log=log,
                checkpoints=checkpoints,
                distiller=distiller,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                env=env,
                device=device,
            ),
        )

        # The loop: one optimisation step per batch; the loss is checked at each log line.
        distiller.train()
        if latest and env.is_main:
            print(f"resuming from step {step} of {total_steps} ({latest})", file=sys.stderr, flush=True)
        progress = progress_bar(total_steps, "distill", unit="step", initial=step, enabled=env.is_main)
        started, epoch = time.perf_counter(), data.start_epoch
        steps = train_steps(data, config.epochs, log, start_step, stop_after_steps, epoch_end)
        for step, epoch, batch in steps:
            with autocast(device, config.precision):
                images = batch.images.contiguous(memory_format=layout)
                batch_loss, student_features = model(
                    images, batch.targets, batch.labels, batch.texts, batch.text_ids
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(batch_loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradient (a no-op without fp16)
            grad_norm = nn.utils.clip_grad_norm_(distiller.parameters(), config.grad_clip or math.inf)
            scaler.step(optimizer)  # fp16: skipped when the scaled gradient overflowed
            scaler.update()
            distiller.loss.clamp_temperature_()
            scheduler.step()

            finite = torch.isfinite(batch_loss.detach()) & torch.isfinite(grad_norm)
            cosine = F.cosine_similarity(student_features.detach(), batch.targets, dim=-1)
            log.add(step, batch, batch_loss, cosine.sum(), finite)
            if step % config.checkpoint_every == 0 or step % config.log_every == 0:
                write_log_line(
                    log, step, epoch, scheduler, total_steps, config.batch_size, progress, checkpoints
                )
            if step % config.checkpoint_every == 0:
                save_checkpoint(
                    step, data, log, checkpoints, distiller, optimizer, scheduler, scaler, env, device
                )
                saved_step = step
            progress.set_description(f"distill epoch {epoch + 1}/{config.epochs}", refresh=False)
            progress.update()
        if step > saved_step:  # where this call ends, finished or stopped
            if log.last.get("step") != step:
                write_log_line(
                    log, step, epoch, scheduler, total_steps, config.batch_size, progress, checkpoints
                )
            save_checkpoint(
                step, data, log, checkpoints, distiller, optimizer, scheduler, scaler, env, device
            )
        progress.close()
        elapsed = time.perf_counter() - started

        finished = data.start_epoch >= config.epochs
        if finished and env.is_main:
            save_student(student, out_dir)  # config.json last: its presence means complete
        log.event(event="end" if finished else "stopped", step=step)
        log.close()
        best = best_epoch(read_validation(out_dir / LOG_NAME), checkpoint_dir) if env.is_main else None
        barrier(env)
        return DistillSummary(
            student_dir=str(out_dir) if finished else None,
            steps=step,
            total_steps=total_steps,
            epochs=config.epochs,
            samples=data.source.num_samples if samples is None else len(samples),
            final_loss=log.last.get("loss"),
            final_cosine=log.last.get("cosine"),
            images_per_second=log.images / elapsed if step > start_step else 0.0,
            corrupt_keys=log.corrupt_keys,
            resumed_from_step=start_step if latest else None,
            teacher_cache=str(cache.path) if cache else None,
            cache_seconds=cache_seconds,
            train_data=config.train_data,
            corrupt_samples=log.data_stats.corrupt,
            failed_shards=log.data_stats.shards_failed,
            input=data.input,
            best_epoch=best.epoch if best else None,
            best_top1=best.top1 if best else None,
            best_checkpoint=best.checkpoint if best else None,
        )


def write_log_line(
    log: TrainLog,
    step: int,
    epoch: int,
    scheduler,
    total_steps: int,
    batch_size: int,
    progress: Any,
    checkpoints: Checkpoints,
) -> None:
    """A log line (a collective under DDP), echoed in the progress bar; refuses a non-finite loss
    of the interval before anything (a checkpoint) is saved after it."""
    remaining = max(total_steps - step, 0) * batch_size
    line = log.write(step, epoch, scheduler.get_last_lr()[0], remaining)
    if log.failure is not None:
        log.event(event="non_finite_loss", step=log.failure.step, keys=log.failure.keys)
        raise non_finite_error(log.failure, epoch, checkpoints.latest())
    progress.set_postfix(
        loss=f"{line['loss']:.4f}", cos=f"{line['cosine']:.4f}", img_s=f"{line['images_per_s']:.0f}"
    )


def save_checkpoint(
    step: int,
    data: TrainData,
    log: TrainLog,
    checkpoints: Checkpoints,
    distiller,
    optimizer,
    scheduler,
    scaler,
    env: DistEnv,
    device: torch.device,
) -> Path | None:
    """Every rank reports the data position and its random state (collectives) and rank 0 writes
    (and returns the folder)."""
    position = {"data": data.state_dict(), "corrupt_keys": log.corrupt_keys}
    rng = gather_rng_states(env, device)
    if env.is_main:
        return checkpoints.save(step, distiller, optimizer, scheduler, scaler, rng, position)
    return None
