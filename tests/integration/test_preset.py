"""preset=llama2_guanaco: the recipe's values, and a real run of it on the tiny model."""

from __future__ import annotations

import json

import torch

from lora_launch.conf.compose import compose
from support.cli import lora_launch, read_jsonl

# The recipe as the issue states it (QLoRA guanaco article).
RECIPE = {
    "model.name": "llama2_7b",
    "quant.mode": "nf4",
    "lora.r": 64,
    "lora.alpha": 16,
    "lora.dropout": 0.1,
    "optim.name": "paged_adamw_32bit",
    "optim.lr": 1e-4,
    "optim.scheduler": "constant",
    "optim.warmup_ratio": 0.03,
    "optim.max_grad_norm": 0.3,
    "optim.weight_decay": 0.001,
    "train.micro_batch_size": 4,
    "train.grad_accum": 1,
    "train.epochs": 3,
    "train.max_steps": -1,
    "data.group_by_length": True,
    "checkpoint.every_steps": 25,
    "logging.every_steps": 25,
    "logging.tensorboard": True,
    "data.source": "hub",
    "data.path": "mlabonne/guanaco-llama2-1k",
    "data.format": "text",
    "data.text_field": "text",
    "sample.prompt": "[INST] Where is Italy? [/INST]",
}


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def test_preset_resolves_to_the_recipe(tmp_path):
    cfg = compose(["preset=llama2_guanaco", f"run.dir={tmp_path}"])
    got = {k: _get(cfg, k) for k in RECIPE}
    assert got == RECIPE
    assert list(cfg.lora.target_modules) == ["q_proj", "v_proj"]


def test_paged_adamw_matches_torch_adamw():
    from omegaconf import OmegaConf

    from lora_launch.train.loop import make_optimizer

    torch.manual_seed(0)
    start = torch.randn(16, 16)
    cfg = OmegaConf.create(
        {"optim": {"name": "paged_adamw_32bit", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.001}}
    )
    params = {}
    for name in ("paged_adamw_32bit", "adamw_torch"):
        cfg.optim.name = name
        p = torch.nn.Parameter(start.clone())
        opt = make_optimizer(cfg, [p])
        for step in range(5):
            (p * torch.linspace(-1, 1, 16) * (step + 1)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        params[name] = p.detach()
    cfg.optim.name = "paged_adamw_32bit"
    assert type(make_optimizer(cfg, [torch.nn.Parameter(start)])).__name__ == "PagedAdamW32bit"
    assert not torch.equal(params["adamw_torch"], start)
    torch.testing.assert_close(params["paged_adamw_32bit"], params["adamw_torch"], rtol=1e-4, atol=1e-5)


def test_preset_runs_on_the_tiny_model_with_guanaco_shaped_text(tiny, tmp_path):
    rows = [
        {"text": f"<s>[INST] Reverse: {r['instruction'][9:]} [/INST] {r['output']} </s>"}
        for r in read_jsonl(tiny["data"])[:64]
    ]
    data = tmp_path / "guanaco.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = lora_launch(
        "preset=llama2_guanaco",
        "model=tiny",
        f"model.path={tiny['model']}",
        "data.source=local",
        f"data.path={data}",
        f"data.cache_dir={tmp_path / 'c'}",
        "train.seq_len=64",
        "train.max_steps=3",
        "quant.compute_dtype=bfloat16",
        "logging.every_steps=1",
        "logging.progress_bar=false",
        "sample.max_new_tokens=4",
        "data.val_split=0.1",
        f"run.dir={run}",
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    cfg_text = (run / "config.yaml").read_text()
    assert "paged_adamw_32bit" in cfg_text and "mode: nf4" in cfg_text
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    report = json.loads((run / "data_report.json").read_text())
    assert report["sources"]["train"]["records"] == 64 and report["sources"]["train"]["truncated"] == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 16 and adapter["lora_dropout"] == 0.1
