"""The same commands on a second architecture, with two more optimizers and with mixed sources: train,
checkpoint, stop with SIGTERM, resume to losses bitwise equal to an uninterrupted run, and generate."""

from __future__ import annotations

import subprocess

from support.cli import CLI, lora_launch, subprocess_env
from support.resume import stopped_and_resumed_equals_uninterrupted
from support.tiny import make_tiny_qwen2

SHORT = [
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "data.max_samples=40",
    "train.max_steps=8",
    "checkpoint.every_steps=2",
    "logging.tensorboard=false",
    "sample.max_new_tokens=4",
    "eval.at_start=false",
    "lora.dropout=0.1",
]


def test_a_second_architecture_trains_resumes_and_generates(tiny, tmp_path):
    """Qwen2 with bitsandbytes' 8-bit AdamW: r=64 makes the LoRA matrices large enough (>= 4096 values) for its
    8-bit states, whose quantisation maps and block scales must come back with the checkpoint."""
    model = make_tiny_qwen2(tmp_path, tiny["model"])
    args = [
        *tiny["overrides"],
        *SHORT,
        f"model.path={model}",
        "lora.target_modules=all-linear",
        "optim.name=adamw_bnb_8bit",
        "lora.r=64",
    ]
    stopped_and_resumed_equals_uninterrupted(tmp_path, args)
    run = tmp_path / "run"
    # all-linear: every projection of Qwen2's attention and MLP got an adapter, the tied head did not
    from safetensors.torch import load_file

    names = load_file(run / "checkpoints" / "step-8" / "adapter_model.safetensors").keys()
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    out = subprocess.run(
        [CLI, "generate", f"run.dir={run}", "prompt=Reverse: cat dog sun", "max_new_tokens=4"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]


def test_attention_and_targets_are_checked_before_launch(tiny, tmp_path):
    for override, line in (
        ("model.attn_implementation=no_such_attention", "model.attn_implementation=no_such"),
        ("lora.target_modules=[no_such_proj]", "use lora.target_modules=all-linear"),
    ):
        refused = lora_launch(*tiny["overrides"], f"run.dir={tmp_path / 'r'}", override, cwd=tmp_path)
        assert refused.returncode == 2 and line in refused.stderr, (override, refused.stderr[-1000:])
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_mixed_sources_resume_exactly(tiny, tmp_path):
    """Two sources mixed 1:2 are one training stream: stopped with SIGTERM and resumed (torch's fused AdamW here),
    the losses equal an uninterrupted run's bit for bit."""
    import json

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"count {i} {i + 1} {i + 2}"}) + "\n" for i in range(30)))
    sources = f"data.sources=[{{path: {tiny['data']}, weight: 1}},{{path: {other}, weight: 2, format: text}}]"
    stopped_and_resumed_equals_uninterrupted(
        tmp_path, [*tiny["overrides"], *SHORT, sources, "optim.name=adamw_torch_fused"]
    )
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert [s["weight"] for s in report["sources"].values()] == [1.0, 2.0]
