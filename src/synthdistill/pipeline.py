"""``synthdistill run``: every stage in order over one run directory.

Each stage's identity (:mod:`synthdistill.identity`) folds in the identities of the stages before
it, so changing a prompt setting invalidates the images, the student and everything after, while a
speed-only setting (a batch size, workers) invalidates nothing; the manifest refuses to mix outputs
unless the run is forced. A stage recorded as running under the same identity is simply called
again: generation skips finished shards and distillation resumes from its checkpoint, and the
temporaries a killed run left behind are removed first, so a killed run finishes with the same
files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from synthdistill import identity
from synthdistill.config import STAGES, RecipeConfig, dump_recipe, hashed_settings
from synthdistill.errors import SynthdistillError, argument
from synthdistill.preflight import check_inputs
from synthdistill.registry import Domain, resolve_domain
from synthdistill.rundir import RunDir
from synthdistill.runtime import DistEnv, barrier, dist_env, init_distributed, resolve_device, waiting_group
from synthdistill.shards import read_index

log = logging.getLogger(__name__)

# Stages that use every rank under torchrun; the others run on rank 0 while the rest wait.
PARALLEL_STAGES = ("generate", "distill")


@dataclass
class RunResult:
    """What a pipeline run did: per stage 'done' (ran now), 'skipped' (already done) or 'not run'."""

    run_dir: Path
    stages: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def evaluates_own_shards(recipe: RecipeConfig, domain: Domain) -> bool:
    """A user's own classes have no real test set: the run then evaluates on its synthetic images."""
    return not recipe.evaluate.datasets and not recipe.evaluate.image_folder and domain.eval is None


def export_test_sets(recipe: RecipeConfig, domain: Domain, results: Path | None) -> list:
    """The real test sets the run's evaluation read, for export to check its fp16/int8 forms on; none
    when evaluate has not run (no ``results``), evaluated the run's own shards, or no fp16/int8 form
    is asked for."""
    if results is None or not set(recipe.export.precision) - {"fp32"} or evaluates_own_shards(recipe, domain):
        return []
    from synthdistill.evaluate.stage import resolve_test_sets
    from synthdistill.evaluate.test_sets import MissingTestSet

    try:
        return resolve_test_sets(recipe.evaluate, domain)
    except MissingTestSet as error:  # the synthetic held-out images still check the forms
        log.warning("The fp16/int8 forms are checked on synthetic images only: %s", error)
        return []


def stage_identities(recipe: RecipeConfig, domain: Domain, device_type: str) -> dict[str, str]:
    """Each stage's output identity: its own result settings and every upstream stage's identity.
    ``device_type`` ('cpu', 'cuda') resolves ``precision: auto``."""
    ids: dict[str, str] = {}
    ids["prompts"] = identity.prompts_identity(domain, recipe.prompts, recipe.seed, device_type)
    ids["generate"] = identity.shards_identity(ids["prompts"], recipe.generate, device_type)
    data = recipe.distill.train_data or ids["generate"]
    from synthdistill.student import init_identity

    init = recipe.distill.init  # a start that does not exist yet stops the distill stage, not this
    init = init_identity(init) if init is not None and Path(init).exists() else init
    ids["distill"] = identity.student_identity(data, recipe.distill, recipe.seed, device_type, init)
    own_shards = ids["generate"] if evaluates_own_shards(recipe, domain) else None
    ids["evaluate"] = identity.evaluation_identity(ids["distill"], recipe.evaluate, domain, own_shards)
    ids["export"] = identity.export_identity(ids["distill"], domain, recipe.export, ids["evaluate"])
    return ids


RUN_KEYS = ("dataset", "classes_file", "superclass", "seed")


def stage_settings(recipe: RecipeConfig, stage: str) -> dict[str, object]:
    """A stage's result settings as flat recipe keys (``distill.epochs``) and the run-level keys
    every stage depends on: recorded in the manifest, so a refused rerun names what changed."""
    own = {f"{stage}.{key}": value for key, value in hashed_settings(getattr(recipe, stage)).items()}
    return {key: getattr(recipe, key) for key in RUN_KEYS} | own


def _as_dict(summary: object) -> dict:
    if summary is None:
        return {}
    if hasattr(summary, "to_dict"):
        return summary.to_dict()
    if dataclasses.is_dataclass(summary):
        return dataclasses.asdict(summary)
    return dict(summary) if isinstance(summary, dict) else {"result": str(summary)}


def _stage_runners(recipe: RecipeConfig, domain: Domain, run: RunDir) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per stage, calling that stage's public function."""

    def prompts():
        from synthdistill.prompts import write_prompts

        return write_prompts(domain, recipe.prompts, run.prompts, seed=recipe.seed, device=recipe.device)

    def generate():
        from synthdistill.generate import generate_images

        return generate_images(run.prompts, run.shards, recipe.generate, device=recipe.device)

    def distill():
        from synthdistill.train import distill_student
        from synthdistill.train.validate import validation_data

        evaluate = recipe.evaluate
        validation = validation_data(
            evaluate.datasets, domain, evaluate.data_root, evaluate.batch_size, evaluate.workers
        )
        return distill_student(
            run.shards,
            run.student,
            recipe.distill,
            domain=domain,
            seed=recipe.seed,
            device=recipe.device,
            checkpoint_dir=run.checkpoints,
            cache_dir=run.teacher_cache,
            validation=validation,
        )

    def evaluate():
        from synthdistill.evaluate import evaluate as evaluate_student

        config = recipe.evaluate
        if evaluates_own_shards(recipe, domain):
            config = dataclasses.replace(config, image_folder=str(run.shards))
        return evaluate_student(
            config, run.eval, student_dir=run.student, domain=domain, device=recipe.device
        )

    def export():
        from synthdistill.deploy.export import export_student

        results = run.eval / "results.json"
        results = results if results.is_file() else None
        return export_student(
            run.student,
            domain,
            run.export,
            recipe.export,
            eval_results=results,
            test_sets=export_test_sets(recipe, domain, results),
            device=recipe.device,
        )

    return {
        "prompts": prompts,
        "generate": generate,
        "distill": distill,
        "evaluate": evaluate,
        "export": export,
    }


def _describe(stage: str, recipe: RecipeConfig, domain: Domain, run: RunDir) -> str:
    per_class = recipe.prompts.per_class or domain.images_per_class
    total = per_class * domain.num_classes
    eval_target = ", ".join(recipe.evaluate.datasets) or recipe.evaluate.image_folder or domain.name
    return {
        "prompts": f"{total:,} {recipe.prompts.generator} prompts for {domain.num_classes} classes "
        f"-> {run.prompts}",
        "generate": f"{total:,} images with {recipe.generate.model} ({recipe.generate.steps} steps) "
        f"-> {run.shards}",
        "distill": f"{recipe.distill.teacher} -> {recipe.distill.student}, loss {recipe.distill.loss}, "
        f"{recipe.distill.epochs} epochs -> {run.student}",
        "evaluate": f"zero-shot on {eval_target} -> {run.eval}",
        "export": f"{', '.join(recipe.export.formats)} -> {run.export}",
    }[stage]


def _stage_range(start_from: str | None, until: str | None) -> list[str]:
    for name in (start_from, until):
        if name is not None and name not in STAGES:
            raise SynthdistillError(f"Unknown stage '{name}'; stages are {', '.join(STAGES)}.")
    first = STAGES.index(start_from) if start_from else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise SynthdistillError(
            f"{argument(f'--from {start_from}', f'start_from={start_from!r}')} comes after "
            f"{argument(f'--until {until}', f'until={until!r}')}."
        )
    return list(STAGES[first : last + 1])


def pending_stages(
    run: RunDir, selected: list[str], identities: dict[str, str], start_from: str | None
) -> list[str]:
    """The selected stages that will run: all of them under ``start_from``, else those not recorded
    as done under their identity."""
    if start_from is not None:
        return selected
    done = {
        stage
        for stage in selected
        if (record := run.stage_record(stage))
        and record["status"] == "done"
        and record["config_hash"] == identities[stage]
    }
    return [stage for stage in selected if stage not in done]


def _silent(_: str) -> None:
    pass


def run_pipeline(
    recipe: RecipeConfig,
    *,
    until: str | None = None,
    start_from: str | None = None,
    force: bool = False,
    report: bool = True,
    echo: Callable[[str], None] = print,
    env: DistEnv | None = None,
) -> RunResult:
    """Run the recipe's stages in order in ``recipe.run_path``.

    ``start_from`` runs that stage and all after it again; ``until`` stops after a stage;
    ``force`` redoes the stages whose identity changed. Neither ever deletes an output whose
    identity is unchanged: such a stage is called again over its outputs and resumes on them.
    """
    env = env or dist_env()
    if not env.is_main:
        echo = _silent
    domain = resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
    run = RunDir(recipe.run_path)
    selected = _stage_range(start_from, until)
    if "distill" in selected:
        from synthdistill.train.validate import check_init_exists

        check_init_exists(recipe.distill.init)  # before any work: the chain's first stage is missing
    device = resolve_device(recipe.device, env)
    # rank 0 alone decides and records; the others would hash local weights for nothing
    identities = stage_identities(recipe, domain, device.type) if env.is_main else {}
    if env.is_main:  # everything the stages still to run need, before any of them starts
        check_inputs(recipe, domain, pending_stages(run, selected, identities, start_from))
    if env.is_distributed:
        init_distributed(env, device)
    group = waiting_group(env)
    if env.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.remove_stale_temporaries()
    runners = _stage_runners(recipe, domain, run)
    result = RunResult(run_dir=run.root)
    config_written = False
    for stage in STAGES:
        if stage not in selected:
            result.stages[stage] = "not run"
            continue
        redo = start_from is not None  # every selected stage comes at or after --from
        if env.is_main:
            settings = stage_settings(recipe, stage)
            done = run.begin_stage(
                stage, identities[stage], force=force or redo, redo=redo, settings=settings
            )
        barrier(env, group)
        if not env.is_main:  # rank 0 has decided and recorded it
            done = run.stage_record(stage)["status"] == "done"
        if done:
            echo(f"[{stage}] already done under this config, skipped")
            result.stages[stage] = "skipped"
            continue
        if env.is_main and not config_written:  # the recipe of what is on disk, never of a refused run
            run.write_config(dump_recipe(recipe))
            config_written = True
        echo(f"[{stage}] {_describe(stage, recipe, domain, run)}")
        started = time.time()
        summary = None
        if env.is_main or stage in PARALLEL_STAGES:
            summary = runners[stage]()
        barrier(env, group)
        for warning in getattr(summary, "warnings", list)():
            echo(f"[{stage}] warning: {warning}")
        if env.is_main:
            record = {**_as_dict(summary), "seconds": round(time.time() - started, 2)}
            if stage == "generate":  # every rank's images, not only rank 0's share
                record["images_in_shards"] = (read_index(run.shards) or {}).get("total")
            run.finish_stage(stage, identities[stage], record)
        result.stages[stage] = "done"
    if env.is_main:
        from synthdistill.report import headline_lines, write_report

        for line in headline_lines(run):
            echo(line)
    if report and env.is_main:
        result.report = write_report(run.root)
        echo(f"report: {result.report} (and {result.report.with_suffix('.html')})")
    return result
