"""Whether a checkpoint's config may be resumed under this run's config: the keys that differ,
beyond those the schema marks as free to change (`resume="free"` on the field) and those the user allows."""

from __future__ import annotations

from pathlib import Path

from lora_launch.conf.schema import resume_free_keys


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, now: dict, allow: list[str]) -> list[str]:
    """Config keys that differ between a checkpoint's config and this run's, beyond what may change."""
    old, new = _flatten(saved), _flatten(now)
    free = resume_free_keys() + tuple(allow)  # marked on the schema's fields
    # keys only one side has come from a schema change between versions, not from the user
    return [
        f"{k}: {old[k]!r} -> {new[k]!r}"
        for k in sorted(set(old) & set(new))
        if old[k] != new[k] and not _covered(k, free)
    ]


def resume_refusal(path: Path, diff: list[str]) -> str:
    """The one-line refusal of a resume from `path` under a config differing in `diff`."""
    return (
        f"cannot resume from {path}: " + "; ".join(diff) + ". Set resume.allow_changes=[KEY,...] "
        "for changes that are safe (e.g. optim.lr), resume.mode=never to start over, or use another run.dir"
    )
