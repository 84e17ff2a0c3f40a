"""One dtype vocabulary: conf/dtypes.py's table gives the schema's choices, accelerate's mixed_precision, the torch
dtypes and the preview's bytes per element; no other module spells a dtype's name."""

from __future__ import annotations

import ast

import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.conf.dtypes import FLOATS, PACKED, compute_precision, torch_dtype, weight_dtype
from lora_launch.conf.schema import AutoDtype, Dtype, StorageDtype
from lora_launch.launcher.preview import DTYPE_BYTES
from lora_launch.run.plan import RunPlan
from support.cli import REPO

PACKAGES = ("conf", "run", "data", "launcher", "train", "serve", "catalog", "sweep", "studio", "cli")
TABLE = REPO / "conf" / "dtypes.py"


def test_the_accepted_values_are_the_tables():
    assert list(Dtype.__members__) == list(FLOATS) == ["bfloat16", "float16", "float32"]
    assert list(AutoDtype.__members__) == ["auto", "bfloat16", "float16", "float32"]
    assert list(StorageDtype.__members__) == ["uint8", "bfloat16", "float16", "float32"]


@pytest.mark.parametrize("precision,mixed", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "no")])
def test_accelerates_mixed_precision_comes_from_the_table(precision, mixed):
    cfg = compose([f"train.precision={precision}"])
    assert RunPlan.from_config(cfg, 1, 1, on_gpu=True, bf16=True).mixed_precision == mixed


@pytest.mark.parametrize("name", [*FLOATS, PACKED])
def test_torch_dtypes_and_bytes_per_element(name):
    assert torch_dtype(name) == getattr(torch, name)
    if name in FLOATS:
        assert torch.empty(0, dtype=torch_dtype(name)).element_size() == FLOATS[name].bytes == DTYPE_BYTES[name]
    with pytest.raises(KeyError):
        torch_dtype("int64")


def test_auto_is_resolved_in_one_place():
    assert compute_precision("auto", bf16=True) == "bfloat16" and compute_precision("auto", bf16=False) == "float32"
    assert compute_precision("float16", bf16=True) == "float16"
    assert weight_dtype("auto", "bfloat16") == "bfloat16" and weight_dtype("auto", "float16") == "float32"
    assert weight_dtype("float16", "float32") == "float16"


def test_no_module_but_the_table_spells_a_dtype_name():
    """String literals only: prose and messages may name a dtype. The strategies sit below conf (tests/unit/
    test_layers.py) and read the names the run plan resolved, so they are not scanned."""
    names = {*FLOATS, PACKED}
    wrong = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path != TABLE
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert wrong == []
