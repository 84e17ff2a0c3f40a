"""The studio confines every field the schema marks as a path (`pathlike`), read from the schema so that a new
field is covered without a list here: each one, set to a place outside --root through the form, is refused
naming its key; inside, it passes. Hub names and tracking URIs are paths where they resolve to one."""

from __future__ import annotations

import json
import re

import pytest

from lora_launch.conf.schema import ConfigError, asset_path, path_keys
from lora_launch.studio import form as forms
from lora_launch.studio.paths import Places, confine

OUTSIDE = "outside the folders this studio may use"


@pytest.fixture
def places(tmp_path):
    """A studio root holding a checkpoint and a data file, and a folder outside it holding the same."""
    root, other = tmp_path / "root", tmp_path / "other"
    for base in (root, other):
        (base / "ckpt").mkdir(parents=True)
        (base / "ckpt" / "manifest.json").write_text("{}")  # resume.mode must name a checkpoint to compose
        (base / "d.jsonl").write_text('{"text": "x"}\n')
    return Places(root)


def _refused(key: str, value: str) -> str:
    return "^" + re.escape(f"{key}={value}: {OUTSIDE}")


def _checked(places: Places, values: dict, groups: dict | None = None):
    """What the studio does with a form: overrides, the command line's composition, then confinement."""
    confine(forms.compose_checked(forms.build_overrides(groups or {}, {"run.dir": "runs/x", **values})), places)


def _form_value(key: str, meta: dict, place: str) -> tuple[str, str, str]:
    """(form key, form value, the key the refusal names) that sets `key` to the path `place`."""
    value = f"sqlite:///{place}/mlflow.db" if meta["uri"] else place
    if "[*]." not in key:
        return key, value, key
    head, _, field = key.partition("[*].")
    entry = {"path": "d.jsonl", "weight": 1, field: value}
    return head, json.dumps([entry]), f"{head}[0].{field}"


def test_the_schema_marks_the_paths_the_studio_must_confine():
    marked = set(path_keys())
    assert {
        "model.path",
        "model.tokenizer",
        "data.name",
        "data.path",
        "data.cache_dir",
        "data.sources[*].path",
        "data.sources[*].cache_dir",
        "launcher.hostfile",
        "launcher.accelerate_config",
        "distributed.deepspeed_config",
        "logging.mlflow.tracking_uri",
        "resume.mode",
        "run.dir",
    } <= marked


@pytest.mark.parametrize("key,meta", sorted(path_keys().items()))
def test_every_path_field_is_refused_outside_the_root(places, key, meta):
    other = places.root.parent / "other"
    form_key, value, named = _form_value(key, meta, str(other / "ckpt"))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{named}=") + f".*{OUTSIDE}"):
        _checked(places, {form_key: value})
    _checked(Places(places.root, [other]), {form_key: value})  # --allow-path lets it in
    form_key, value, _ = _form_value(key, meta, str(places.root / "ckpt"))
    _checked(places, {form_key: value})
    if meta["path"] == "writes":  # the bundled assets may be read, never written
        form_key, value, named = _form_value(key, meta, asset_path("tiny-llama"))
        with pytest.raises(ConfigError, match="^" + re.escape(f"{named}=") + f".*{OUTSIDE}"):
            _checked(places, {form_key: value})


def test_a_hub_dataset_named_by_an_outside_path_is_refused(places):
    other = places.root.parent / "other"
    with pytest.raises(ConfigError, match=_refused("data.name", f"{other}/d.jsonl")):
        _checked(places, {"data.name": f"{other}/d.jsonl"}, {"data": "hub"})
    hub_entry = json.dumps([{"source": "hub", "path": f"{other}/d.jsonl", "weight": 1}])
    with pytest.raises(ConfigError, match=_refused("data.sources[0].path", f"{other}/d.jsonl")):
        _checked(places, {"data.sources": hub_entry})
    (places.root / "org").symlink_to(other)  # a hub-like name that resolves to a local place outside
    with pytest.raises(ConfigError, match=_refused("data.name", "org/d.jsonl")):
        _checked(places, {"data.name": "org/d.jsonl"}, {"data": "hub"})
    _checked(places, {"data.name": "OWNER/dataset"}, {"data": "hub"})  # a hub id, nothing local: fine


def test_a_tracking_uri_writing_outside_is_refused(places):
    other = places.root.parent / "other"
    for uri in (
        f"sqlite:///{other}/x.db",
        f"file://{other}/mlruns",
        f"{other}/mlruns",
        "~/mlruns",
        "sqlite:///../x.db",
    ):
        with pytest.raises(ConfigError, match=_refused("logging.mlflow.tracking_uri", uri)):
            _checked(places, {"logging.mlflow.tracking_uri": uri})
    for uri in ("sqlite:///mlflow.db", "file:mlruns", "mlruns", "http://127.0.0.1:5000", "databricks"):
        _checked(places, {"logging.mlflow.tracking_uri": uri})
