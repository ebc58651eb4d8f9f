"""The run directory and its manifest: which stage finished under which identity.

A rerun skips finished stages, resumes a stage that was interrupted under the same identity (after
removing the temporaries its killed writers left), and refuses to mix outputs made under another
identity (:mod:`synthdistill.identity`) unless told ``force``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthdistill.errors import SynthdistillError, argument
from synthdistill.fileio import atomic_write_json, atomic_write_text, read_json
from synthdistill.fileio import remove_stale_temporaries as remove_stale

MANIFEST_NAME = "manifest.json"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """'distill.epochs: 8 -> 4, distill.lr: 0.002 -> 0.001' between two recorded settings; a
    sentence saying why when no key differs (an upstream stage, local weights or the device)."""
    if old is None or new is None:
        return "settings not recorded"
    changes = [
        f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    if not changes:
        return "no key of its own changed: an earlier stage, a local weights file or the device type did"
    return ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")


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

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove what killed writers left anywhere in the run (temporaries, lock files)."""
        return remove_stale(self.root)

    def manifest(self) -> dict:
        return read_json(self.manifest_path) if self.manifest_path.is_file() else {"stages": {}}

    def stage_record(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def begin_stage(
        self,
        stage: str,
        identity: str,
        force: bool = False,
        redo: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> bool:
        """Decide what to do with a stage. Returns True if it is already done (skip it).

        Records the stage as running under ``identity`` (and its ``settings``, flat recipe keys, so
        a later refusal can name what changed) otherwise. A record under another identity
        is refused unless ``force`` (or ``redo``); its outputs are then cleared. ``redo`` runs a
        stage again even though it is done; outputs whose identity did not change are never
        cleared, by ``force`` or ``redo``: the stage is called again over them and resumes on them.
        Temporaries that killed writers left in the stage's outputs are removed either way.
        """
        record = self.stage_record(stage)
        changed = record is not None and record["config_hash"] != identity
        if record and not changed and not redo:
            if record["status"] == "done":
                return True
        elif changed and not force:
            raise SynthdistillError(
                f"'{self.root}' holds {stage} outputs made under other settings "
                f"({describe_changes(record.get('settings'), settings)}); use "
                f"{argument('--force', 'force=True')} to redo what changed, "
                f"{argument(f'--from {stage}', f'start_from={stage!r}')} to redo from this stage, or "
                f"{argument('another --name', 'another run_dir (or name) in the recipe')}."
            )
        elif changed:
            for path in self.stage_outputs(stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for path in self.stage_outputs(stage):
            if path.is_dir():
                remove_stale(path)
            else:  # a file of the run's root: the root's own temporaries, not the other stages'
                remove_stale(path.parent, recursive=False)
        record = {"config_hash": identity, "status": "running", "started": time.time()}
        if settings is not None:
            record["settings"] = settings
        self._write_record(stage, record)
        return False

    def finish_stage(self, stage: str, identity: str, summary: dict | None = None) -> None:
        record = self.stage_record(stage) or {}
        self._write_record(
            stage,
            {
                **record,
                "config_hash": identity,
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
