"""Every model and data set a run needs, checked against local paths and caches before any work.

Without a network, a stage that finds a hub model missing fails after minutes of earlier stages
(and after the hub's retry loop); ``run`` instead lists everything missing in one message, each with
the recipe key that takes a local path. When everything is cached but the hub cannot be reached,
offline mode is switched on for this process, so the libraries load from the cache at once instead of
retrying the network for each file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from synthdistill.config import RecipeConfig
from synthdistill.errors import SynthdistillError, setting
from synthdistill.registry import Domain
from synthdistill.tiny import TINY_DIFFUSION_NAMES, is_tiny

HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class Need:
    """One model or data set a stage reads: the recipe ``key`` that names it, the ``name`` it has
    there, what to pass instead (``instead``), and where it is found: ``repo`` on the Hugging Face
    hub (with ``files``, any of which will do), or the local ``path`` it must exist at."""

    key: str
    name: str
    instead: str
    repo: str | None = None
    files: tuple[str, ...] = ()
    path: Path | None = None
    url_cache: Path | None = None  # open_clip's own download cache, for weights it fetches by URL


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).suffix in (".safetensors", ".bin", ".pt", ".pth")


def _model(key: str, name: str, instead: str, files: tuple[str, ...] = ()) -> Need:
    path = Path(name).expanduser()
    if path.exists() or _looks_local(name):
        return Need(key, name, instead, path=path)
    return Need(key, name, instead, repo=name, files=files)


def _open_clip_weights(model_key: str, key: str, model: str, pretrained: str | None) -> list[Need]:
    """An open_clip model's weights (a teacher's, the filter's): its pretrained tag where open_clip
    would fetch it from (its hub repo and file, or a URL into ~/.cache/clip), or a local file; an
    ``hf-hub:`` model by its repo. ``tiny`` needs nothing."""
    import open_clip

    if is_tiny(model):
        return []
    if model.startswith("hf-hub:"):
        return [_model(model_key, model[7:], "a local open_clip model")]
    if not pretrained:
        return []
    instead = "a local open_clip checkpoint file"
    if _looks_local(pretrained) or Path(pretrained).expanduser().exists():
        return [Need(key, pretrained, instead, path=Path(pretrained).expanduser())]
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    hub = cfg.get("hf_hub", "")
    if hub:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else Path(filename).stem + ".safetensors"
        return [Need(key, pretrained, instead, repo=repo, files=(safe, filename))]
    url = cfg.get("url", "")
    if url:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        return [Need(key, pretrained, instead, url_cache=cached)]
    return []  # open_clip itself refuses an unknown tag, naming the known ones


def recipe_needs(recipe: RecipeConfig, domain: Domain, stages: Sequence[str]) -> list[Need]:
    """What ``stages`` of ``recipe`` will load; ``tiny`` models are built in code and need nothing."""
    needs: list[Need] = []
    prompts, generate, distill, evaluate = recipe.prompts, recipe.generate, recipe.distill, recipe.evaluate
    if "prompts" in stages and prompts.generator in ("paper", "llm") and not is_tiny(prompts.llm):
        needs.append(
            _model("prompts.llm", prompts.llm, "a local transformers chat-model folder", ("config.json",))
        )
    if "generate" in stages:
        if generate.model not in TINY_DIFFUSION_NAMES:
            needs.append(
                _model("generate.model", generate.model, "a local diffusers folder", ("model_index.json",))
            )
        from synthdistill.generate import effective_lora

        lora = effective_lora(generate.model, generate.lora)
        if lora:
            needs.append(_model("generate.lora", lora, "a LoRA folder or .safetensors file"))
        if generate.vae:
            needs.append(
                _model("generate.vae", generate.vae, "a local diffusers VAE folder", ("config.json",))
            )
        if generate.filter == "teacher":
            needs += _open_clip_weights(
                "generate.filter_model",
                "generate.filter_pretrained",
                generate.filter_model,
                generate.filter_pretrained,
            )
    if "distill" in stages:
        needs += _open_clip_weights(
            "distill.teacher", "distill.teacher_pretrained", distill.teacher, distill.teacher_pretrained
        )
        local = {"distill.init": (distill.init, "a student or checkpoint folder")}
        if isinstance(distill.student_pretrained, str) and _looks_local(distill.student_pretrained):
            local["distill.student_pretrained"] = (distill.student_pretrained, "a local weights file")
        needs += [
            Need(k, name, instead, path=Path(name).expanduser())
            for k, (name, instead) in local.items()
            if name
        ]
    if "evaluate" in stages:
        if evaluate.image_folder:
            folder = Path(evaluate.image_folder).expanduser()
            needs.append(Need("evaluate.image_folder", evaluate.image_folder, "an image folder", path=folder))
        names = list(evaluate.datasets)
        if not names and not evaluate.image_folder and domain.eval is not None:
            names = [domain.name]
        needs += [Need("evaluate.data_root", name, "the folder that holds it") for name in names]
    return needs


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_cached(repo: str, files: Sequence[str], cache_dir: Path) -> bool:
    """Whether the hub cache holds the repo (one of ``files`` when named, else any snapshot)."""
    from huggingface_hub import try_to_load_from_cache

    if files:
        return any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in files)
    snapshots = cache_dir / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def is_available(need: Need, data_root: str, cache_dir: Path) -> bool:
    """Whether ``need`` can be read without a network: on disk, or in the hub or open_clip cache."""
    if need.key == "evaluate.data_root":
        from synthdistill.evaluate.test_sets import test_set_on_disk

        return test_set_on_disk(need.name, data_root)
    if need.path is not None:
        return need.path.exists()
    if need.url_cache is not None:
        return need.url_cache.is_file()
    if need.repo is not None:
        return _repo_cached(need.repo, need.files, cache_dir)
    return True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set, or the hub unreachable (one TCP connection, a few seconds at most)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        return True
    return False


def go_offline() -> None:
    """Offline mode for this process and its children: the caches answer, no retry loop runs."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def _missing_line(need: Need, data_root: str) -> str:
    if need.key == "evaluate.data_root":
        return (
            f"test set '{need.name}' is not under '{data_root}': put it there (README, Stage 4), pass "
            f"{setting('evaluate.data_root', 'DIR')}, or {setting('evaluate.download', 'true')} with "
            "network access"
        )
    where = "does not exist" if need.path is not None else "is not in the local cache"
    return f"{need.key} '{need.name}' {where}: pass {need.instead} with {setting(need.key)}"


def check_inputs(
    recipe: RecipeConfig, domain: Domain, stages: Sequence[str], cache_dir: Path | None = None
) -> None:
    """Refuse to start ``stages`` when something they need is missing and cannot be fetched: local
    paths always, cached models when offline, test sets unless downloading online. Everything missing is
    named in one message. Online with everything at hand, nothing changes; offline with everything
    cached, :func:`go_offline`."""
    needs = recipe_needs(recipe, domain, stages)
    if not needs:
        return
    cache_dir = cache_dir or hub_cache_dir()
    data_root = recipe.evaluate.data_root
    missing = [n for n in needs if not is_available(n, data_root, cache_dir)]
    fetchable = [n for n in missing if n.repo is not None or n.url_cache is not None]
    if recipe.evaluate.download:
        fetchable += [n for n in missing if n.key == "evaluate.data_root"]
    remote = any(n.repo is not None or n.url_cache is not None for n in needs) or fetchable
    offline = hub_offline() if remote else False
    blocking = [n for n in missing if offline or n not in fetchable]
    if blocking:
        lines = "; ".join(_missing_line(n, data_root) for n in blocking)
        reason = " (offline: nothing can be downloaded)" if offline and fetchable else ""
        raise SynthdistillError(
            f"This run cannot start{reason}, {len(blocking)} input{'s' if len(blocking) > 1 else ''} "
            f"missing: {lines}."
        )
    if offline:
        go_offline()
