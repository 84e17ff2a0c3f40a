"""The checkpoint contract on disk, shared by the launcher (which checks before anything is written) and
training (which loads): which files a loader reads, and when a checkpoint counts as complete.

A checkpoint `RUN/checkpoints/step-N/` is loadable only if its manifest.json is of this FORMAT, carries
the step, config and fingerprints a resume is checked against, and lists every file the loader reads
with its size and sha256, each matching. train/checkpoint.py writes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora_launch.conf.errors import UserError
from lora_launch.run.rundir import committed_checkpoints

FORMAT = 1
MANIFEST_KEYS = {"step": int, "config": dict, "fingerprints": dict}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def loaded_files(world: int) -> list[str]:
    """Every file the loader may read from a checkpoint saved by `world` processes (any rank resumes)."""
    rng = [f"rng-rank{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")]
    return ["trainable.safetensors", "state.json", *rng]


def listed_files(path: Path, manifest: dict) -> dict:
    """The manifest's checksums of every file the loader reads; CheckpointError naming the first it lacks."""
    world, files = manifest.get("world_size"), manifest.get("files")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{path}: manifest.json has no usable world_size ({world!r}); not a complete checkpoint")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: manifest.json lists no files; not a complete checkpoint")
    listed = {}
    for name in loaded_files(world):
        meta = files.get(name)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise CheckpointError(
                f"{path}: manifest.json does not list {name} with its size and sha256; not a complete checkpoint"
            )
        listed[name] = meta
    return listed


def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` if it is complete (see the module's docstring); else CheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable manifest.json ({e}); not a complete checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found}, this version reads {FORMAT}")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CheckpointError(f"{path}: manifest.json has no {key}; not a complete checkpoint")
    for name, meta in listed_files(path, manifest).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} is missing or does not match its checksum")
    return manifest


def choose(run_dir: Path, resume_mode: str, say=lambda message: None) -> tuple[Path, dict] | None:
    """The checkpoint resume.mode resumes from and its manifest, or None to start fresh.

    `auto`: the newest complete one, skipping (and saying) the others; when every one is rejected,
    CheckpointError (starting over would also wipe the metrics they belong to). A path: that one, or
    CheckpointError. `never`: None.
    """
    if resume_mode == "never":
        return None
    if resume_mode != "auto":
        return Path(resume_mode), verify(Path(resume_mode))
    rejected = []
    for _, path in reversed(committed_checkpoints(Path(run_dir))):
        try:
            return path, verify(path)
        except CheckpointError as e:
            say(f"skipping {e}; trying an older checkpoint")
            rejected.append(str(e))
    if rejected:
        raise CheckpointError(
            f"resume.mode=auto: every checkpoint in {Path(run_dir) / 'checkpoints'} was rejected: "
            f"{'; '.join(rejected)}; fix or remove them, or set resume.mode=never "
            "to start over (it moves the earlier run aside)"
        )
    return None
