"""The run directory and its manifest: which stage finished under which config.

A rerun skips finished stages, resumes a stage that was interrupted under the same config, and
refuses to mix outputs made under a different config unless told ``force``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from synthdistill.errors import SynthdistillError
from synthdistill.fileio import atomic_write_json, atomic_write_text, read_json

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; stages talk to each other only through these files."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher_cache"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def stage_outputs(self, stage: str) -> list[Path]:
        """What a stage writes: cleared when the stage is redone with ``force``."""
        return {
            "prompts": [self.prompts],
            "generate": [self.shards],
            "distill": [self.student, self.checkpoints],
            "evaluate": [self.eval],
            "export": [self.export],
        }[stage]

    def manifest(self) -> dict:
        return read_json(self.manifest_path) if self.manifest_path.is_file() else {"stages": {}}

    def stage_record(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def begin_stage(self, stage: str, config_hash: str, force: bool = False, redo: bool = False) -> bool:
        """Decide what to do with a stage. Returns True if it is already done (skip it).

        Records the stage as running under ``config_hash`` otherwise. A record under another hash
        is refused unless ``force``; its outputs are then cleared, as they are with ``redo`` (redo
        the stage even though its config did not change). A stage whose config did not change is
        never cleared by ``force`` alone: finished work under the same settings is kept.
        """
        record = self.stage_record(stage)
        changed = record is not None and record["config_hash"] != config_hash
        if record and not changed and not redo:
            return record["status"] == "done"
        if changed and not force:
            raise SynthdistillError(
                f"'{self.root}' holds {stage} outputs made under another config "
                f"({record['config_hash']} vs {config_hash}); use --force to redo what changed, "
                f"--from {stage} to redo from this stage, or another --name."
            )
        if record or redo:
            for path in self.stage_outputs(stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self._write_record(stage, {"config_hash": config_hash, "status": "running", "started": time.time()})
        return False

    def finish_stage(self, stage: str, config_hash: str, summary: dict | None = None) -> None:
        record = self.stage_record(stage) or {}
        self._write_record(
            stage,
            {
                **record,
                "config_hash": config_hash,
                "status": "done",
                "finished": time.time(),
                "summary": summary or {},
            },
        )

    def _write_record(self, stage: str, record: dict) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = record
        atomic_write_json(self.manifest_path, manifest)

    def write_config(self, text: str) -> None:
        atomic_write_text(self.config, text)
