"""train.fused_projections through `lora-launch` on the tiny Llama: the same losses as the separate projections (to
float32 rounding), the same adapter, which loads into a plain PEFT model, and a run stopped with the option on
that resumes with it off; under zero2 too."""

from __future__ import annotations

import math

import pytest
import torch

from support.resume import BASE, launch, sigterm_at, status, train_losses

# four launches of 12 steps and one stopped and resumed: about a minute on two cores
pytestmark = pytest.mark.slow

FUSED = "train.fused_projections=true"


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, losses equal to float32 rounding carried through 12 optimizer steps."""
    return [s for s, _ in got] == [s for s, _ in want] and all(
        math.isclose(a, b, rel_tol=1e-4) for (_, a), (_, b) in zip(got, want, strict=True)
    )


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    args = [*tiny["overrides"], *BASE, "lora.target_modules=all-linear"]
    out = {}
    for name, extra in (("separate", []), ("fused", [FUSED])):
        rc, log = launch(root / name, [*args, *extra])
        assert rc == 0, log[-3000:]
        out[name] = (root / name, log)
    return args, root, out


def test_losses_and_adapter_are_the_separate_projections(runs):
    from safetensors.torch import load_file

    _, _, out = runs
    (separate, _), (fused, log) = out["separate"], out["fused"]
    assert "fused projections (train.fused_projections=true): q_proj+k_proj+v_proj in 2 modules" in log
    assert _close(train_losses(fused), train_losses(separate))
    want = load_file(separate / "adapter" / "adapter_model.safetensors")
    got = load_file(fused / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert any(k.endswith("q_proj.lora_A.weight") for k in got)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-3, atol=1e-5, msg=k)


def test_the_adapter_loads_into_a_plain_peft_model(runs, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, out = runs
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out["fused"][0] / "adapter")
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base)  # the trained adapter took effect


def test_a_run_stopped_with_it_on_resumes_with_it_off(runs):
    args, root, out = runs
    run = root / "switched"
    rc, _ = sigterm_at(run, [*args, FUSED], 3)
    assert rc == 0 and status(run)["state"] == "preempted", (rc, status(run))
    rc, log = launch(run, args)
    assert rc == 0 and "resumed from" in log, log[-3000:]
    assert _close(train_losses(run), train_losses(out["separate"][0]))


def test_zero2_runs_it_to_the_same_losses(runs):
    """ZeRO-2 holds the whole base on every process: DeepSpeed's wrapping leaves the joined weights in place."""
    args, root, out = runs
    run = root / "zero2"
    rc, log = launch(run, [*args, FUSED, "distributed=zero2", "launcher.num_processes=1"])
    assert rc == 0, log[-3000:]
    assert _close(train_losses(run), train_losses(out["separate"][0]))
