"""bench.multi's plan without running it: the cases for 2, 4 and 8 GPUs, how they share the GPUs, the
ratios and targets printed next to the figures, the resumed run's losses against two references; and how
bench counts attention FLOPs for MFU."""

from __future__ import annotations

import pytest

from support.bench import bench_module

multi_plan = bench_module("multi_plan")


@pytest.mark.parametrize("n,counts", [(2, [1, 2]), (4, [1, 4, 2]), (8, [1, 8, 4, 2])])
def test_every_count_up_to_the_host_bases_first_then_largest(n, counts):
    assert multi_plan.gpu_counts(n) == counts
    cases = multi_plan.scaling_cases("lora", n)
    assert len(cases) == len({c["name"] for c in cases}) == 5 * len(counts)
    assert [c["nproc"] for c in cases[:5]] == [1] * 5 and {c["nproc"] for c in cases[5:10]} == {n}
    assert {(c["distributed"], c["nproc"]) for c in cases if c["kind"] == "project"} == {
        (d, g) for d in multi_plan.OPTIONS for g in counts
    }
    names = {c["name"] for c in cases}
    for c in cases:  # every ratio's reference is measured in the same phase
        assert {c.get("base"), c.get("ddp_base", c["base"]), c.get("peer", c["base"])} <= names


def test_counts_can_be_narrowed_but_the_bases_stay():
    assert multi_plan.gpu_counts(8, only=[4]) == [1, 4]
    assert {c["nproc"] for c in multi_plan.scaling_cases("qlora", 8, [2])} == {1, 2}


def test_options_get_the_form_they_allow():
    by_name = {c["name"]: c for c in multi_plan.scaling_cases("qlora", 4)}
    assert by_name["qlora_fsdp2_4gpu"]["optim"] == "adamw"  # no bitsandbytes optimizer under FSDP2
    assert "optim" not in by_name["qlora_zero2_4gpu"]
    for d in ("zero3", "fsdp2"):
        assert by_name[f"qlora_{d}_1gpu"]["extra"] == ["quant.storage_dtype=bfloat16"]
    assert "extra" not in by_name["qlora_ddp_4gpu"]
    assert all(c["quant"] == "nf4" and c["ckpt"] for c in by_name.values())
    assert by_name["qlora_zero3_1gpu"]["torchrun"] is True
    assert "torchrun" not in by_name["qlora_ddp_1gpu"]  # the plain 1-GPU run, as in the earlier figures
    peer = by_name["peer_qlora_4gpu"]
    assert peer["kind"] == "peer" and peer["liger"] and peer["nproc"] == 4
    tiny = multi_plan.dry_case(by_name["qlora_zero3_2gpu"], "/m")
    assert tiny["model"] == "tiny" and tiny["optim"] == "adamw" and tiny["extra"][-1] == "quant.storage_dtype=bfloat16"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_waves_share_the_host_without_sharing_a_gpu(n):
    cases = multi_plan.scaling_cases("lora", n)
    plan = multi_plan.waves(cases, n)
    placed = [s["name"] for w in plan for s, _ in w]
    assert sorted(placed) == sorted(c["name"] for c in cases)
    wave_of = {s["name"]: i for i, w in enumerate(plan) for s, _ in w}
    for wave in plan:
        gpus = [g for _, d in wave for g in d.split(",")]
        assert len(gpus) == len(set(gpus)) and all(int(g) < n for g in gpus)
        assert all(len(d.split(",")) == s["nproc"] for s, d in wave)
    for c in cases:
        if c["kind"] == "project" and c["nproc"] > 1:
            assert wave_of[c["base"]] < wave_of[c["name"]] and wave_of[c["peer"]] <= wave_of[c["name"]]
    assert all(len(w) == 1 for w in multi_plan.waves(cases, n, serial=True))


def test_a_case_larger_than_the_host_is_refused():
    with pytest.raises(ValueError, match="lora_ddp_4gpu needs 4 GPUs, the host has 2"):
        multi_plan.waves([c for c in multi_plan.scaling_cases("lora", 4) if c["name"] == "lora_ddp_4gpu"], 2)


def test_node_devices_halve_the_host():
    assert multi_plan.node_devices(8) == ["0,1,2,3", "4,5,6,7"] and multi_plan.node_devices(2) == ["0", "1"]


def rows_for(tokens: dict[str, float]) -> list[dict]:
    cases = {c["name"]: c for c in multi_plan.scaling_cases("lora", 8)}
    return [{"name": name, "spec": cases[name], "tokens_per_s": t} for name, t in tokens.items()]


def test_ratios_and_targets():
    rows = rows_for(
        {
            "lora_ddp_1gpu": 10000.0,
            "lora_zero3_1gpu": 8000.0,
            "peer_lora_4gpu": 6000.0,
            "lora_ddp_4gpu": 9400.0,
            "lora_zero3_4gpu": 7200.0,
            "lora_ddp_2gpu": 9000.0,
        }
    )
    ddp4, zero3, ddp2 = (multi_plan.judge(r, rows) for r in rows[3:])
    assert ddp4["vs_1gpu"] == pytest.approx(0.94) and ddp4["met_vs_1gpu"] is False
    assert multi_plan.target_cell(ddp4, "vs_1gpu") == ">=95% MISS"
    assert ddp4["vs_peer"] == pytest.approx(9400 / 6000) and multi_plan.target_cell(ddp4, "vs_peer") == ">=1.5x met"
    # zero3 against its own 1-GPU figure (90%: met at 85%), and against plain 1-GPU ddp beside it
    assert zero3["vs_1gpu"] == pytest.approx(0.9) and zero3["met_vs_1gpu"] is True
    assert zero3["vs_1gpu_ddp"] == pytest.approx(0.72)
    assert zero3["vs_peer"] == pytest.approx(1.2) and zero3["met_vs_peer"] is False
    # 2 GPUs: a ratio but no scaling target; its peer was not measured: the target shows, unjudged
    assert ddp2["vs_1gpu"] == pytest.approx(0.9) and "target_vs_1gpu" not in ddp2
    assert multi_plan.target_cell(ddp2, "vs_1gpu") == "-"
    assert "vs_peer" not in ddp2 and multi_plan.target_cell(ddp2, "vs_peer") == ">=1.5x ?"
    base = multi_plan.judge(rows[0], rows)
    assert "vs_1gpu" not in base and "vs_1gpu_ddp" not in base  # not against itself


def test_a_row_without_a_figure_is_left_alone():
    row = {
        "name": "lora_ddp_4gpu",
        "spec": multi_plan.scaling_cases("lora", 4)[5],
        "error": "not run: time budget spent",
    }
    assert multi_plan.judge(row, []) == row


def test_resumed_losses_against_the_references_spread():
    a = {s: 5.0 - 0.01 * s for s in range(1, 11)}
    assert multi_plan.loss_spread(a, dict(a), dict(a), 4)["within_spread"] is True  # deterministic: bitwise
    assert multi_plan.loss_spread(a, dict(a), {**a, 7: a[7] + 1e-9}, 4)["within_spread"] is False
    b = {**a, 3: a[3] + 1e-4}
    near = multi_plan.loss_spread(a, b, {**a, 8: a[8] + 1.5e-4}, 4)
    assert near["reference_spread"] == pytest.approx(1e-4) and near["within_spread"] is True
    assert near["resumed_max_diff_after_resume"] == pytest.approx(1.5e-4)
    far = multi_plan.loss_spread(a, b, {**a, 8: a[8] + 3e-2}, 4)
    assert far["within_spread"] is False and far["resumed_vs_spread"] > 100
    assert multi_plan.loss_spread(a, b, {}, None) == {"compared_steps": 0, "within_spread": False}


def test_mfu_counts_attention_over_each_sample_not_the_packed_row():
    """Packed or padded, a token attends only within its own sample: the attention context is sum(n^2)/sum(n),
    the same for both forms of the same samples, and well below the row length for short samples."""
    import numpy as np

    from lora_launch.data.samples import SampleSet, pack

    case, run = bench_module("case"), bench_module("run")
    lengths = [100, 30, 300, 60, 12]
    ids = [np.arange(n) for n in lengths]
    samples = SampleSet.from_lists(ids, ids, np.arange(len(lengths)))
    want = sum(n * n for n in lengths) / sum(lengths)
    assert case.attention_context(samples) == pytest.approx(want)
    assert case.attention_context(pack(samples, 512, seed=0)) == pytest.approx(want)
    spec = {"seq": 512, "micro": 1, "lengths": "lognormal"}
    packed = {"tokens_per_s": 1000.0, "tokens_per_step": 502, "attention_context": want}
    row_long = {"tokens_per_s": 1000.0, "tokens_per_step": 502}
    run.add_mfu(packed, spec, 100.0)
    run.add_mfu(row_long, spec, 100.0)
    assert packed["flops_per_token"] < row_long["flops_per_token"]


def test_mfu_leaves_out_what_grad_ckpt_recomputes_and_hfu_counts_it():
    flops, run = bench_module("flops"), bench_module("run")
    per_token = lambda ckpt: flops.flops_per_token(flops.LLAMA2_7B, 512, ckpt, 64, run.QV)  # noqa: E731

    plain, ckpt = {"tokens_per_s": 1000.0}, {"tokens_per_s": 1000.0}
    run.add_mfu(plain, {"seq": 512}, 100.0)
    run.add_mfu(ckpt, {"seq": 512, "ckpt": True}, 100.0)
    assert ckpt["mfu"] == plain["mfu"] == plain["hfu"] == 1000.0 * per_token(False) / 1e14
    assert ckpt["hfu"] == 1000.0 * per_token(True) / 1e14
    assert 1.45 < ckpt["hfu"] / ckpt["mfu"] < 1.5  # 6N against 4N, attention aside


def test_a_profiled_step_reports_its_costliest_ops_per_step():
    """bench's profile (here on the CPU, whose ops stand in for kernels): three steps of four matmuls come out
    as four calls a step, and the case gets a line in the printed table."""
    import torch

    case, run = bench_module("case"), bench_module("run")
    a, b = torch.randn(384, 384), torch.randn(16, 16)

    def step():
        for _ in range(2):
            a @ a
            b @ b

    out = case.profiled(step, 3)
    assert out["profile_steps"] == 3 and out["device_busy"] is None and 0 < out["host_op_share"] <= 1
    mm = [t for t in out["top"] if t["name"] in ("aten::mm", "aten::matmul")]
    assert mm and mm[0]["calls_per_step"] == pytest.approx(4.0)
    text = run.profile_table([{"name": "step", **out}])
    assert "# profile" in text and "step" in text and "kernels/step" in text
