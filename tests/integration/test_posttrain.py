"""After training: generate, merge (plain and QLoRA) and eval from a run directory."""

from __future__ import annotations

import subprocess

import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.run.rundir import write_config
from lora_launch.train import posttrain
from support.cli import CLI, into_closed_pipe, lora_launch, read_jsonl, subprocess_env


def fake_run(tiny, run, *overrides):
    """A run dir with config.yaml and an adapter whose LoRA weights are random (not zero), so
    merging visibly changes the base model."""
    from peft import LoraConfig, get_peft_model

    from lora_launch.data.tokenizer import load_tokenizer
    from lora_launch.train.model import load_base_model

    cfg = compose([*tiny["overrides"], f"run.dir={run}", "lora.target_modules=[q_proj,v_proj,down_proj]", *overrides])
    write_config(cfg, run)
    torch.manual_seed(1)
    base = load_base_model(cfg, torch.device("cpu"))
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=list(cfg.lora.target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.save_pretrained(run / "adapter", safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(run / "adapter")
    return cfg


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 80, 90, 100, 110, 120]])


def test_merge_gives_the_logits_of_base_plus_adapter(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = fake_run(tiny, run)
    model, _ = posttrain.load_model(cfg, run)
    expected = logits_of(model, IDS)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny["model"]), IDS)
    assert (expected - base).abs().max() > 0.1  # the adapter matters
    assert posttrain.main(["merge", f"run.dir={run}", "dtype=float32", f"out={tmp_path / 'm32'}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m32")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, IDS), expected, rtol=1e-4, atol=1e-4)
    assert posttrain.main(["merge", f"run.dir={run}"]) == 0  # default: bfloat16 into RUN/merged
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert merged.dtype == torch.bfloat16 and (run / "merged" / "model.safetensors").is_file()
    diff = (logits_of(merged, IDS) - expected).abs().max()
    assert diff < 0.02 * expected.abs().max(), diff


def test_qlora_merges_into_the_dequantized_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = fake_run(tiny, run, "quant=nf4", "quant.compute_dtype=bfloat16")
    model, _ = posttrain.load_model(cfg, run)
    expected = logits_of(model, IDS)  # 4-bit base + adapter, as trained
    assert posttrain.main(["merge", f"run.dir={run}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert "quantization_config" not in merged.config.to_dict()
    got = logits_of(merged, IDS)
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    # merging into the original full-precision weights instead would be further off
    full = posttrain.load_model(
        compose([*tiny["overrides"], f"run.dir={run}", "lora.target_modules=[q_proj,v_proj,down_proj]"]), run
    )[0]
    assert (got - expected).abs().max() < (logits_of(full, IDS) - expected).abs().max()


def test_generate_greedy_and_sampled(tiny, tmp_path):
    run = tmp_path / "run"
    cfg = fake_run(tiny, run)
    model, tok = posttrain.load_model(cfg, run)
    greedy = posttrain.complete(model, tok, "[INST] Reverse: cat dog [/INST]", 6)
    ids = [tok.bos_token_id] + tok("[INST] Reverse: cat dog [/INST]", add_special_tokens=False)["input_ids"]
    manual = torch.tensor([ids])
    for _ in range(6):
        manual = torch.cat([manual, logits_of(model, manual)[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy == tok.decode(manual[0, len(ids) :], skip_special_tokens=True)
    a = posttrain.complete(model, tok, "[INST] hi [/INST]", 8, sample=True, temperature=1.5, top_p=1.0, seed=3)
    b = posttrain.complete(model, tok, "[INST] hi [/INST]", 8, sample=True, temperature=1.5, top_p=1.0, seed=3)
    c = posttrain.complete(model, tok, "[INST] hi [/INST]", 8, sample=True, temperature=1.5, top_p=1.0, seed=4)
    assert a == b and a != c


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert posttrain.main(["eval", f"run.dir={tmp_path}"]) == 2
    assert "no config.yaml here" in capsys.readouterr().err
    assert posttrain.main(["merge", "run.dir=x", "colour=red"]) == 2
    assert "unknown argument 'colour=red'" in capsys.readouterr().err


def test_after_a_real_run_eval_generate_merge_from_the_cli(tiny, tmp_path, capsys):
    """The console script on a trained run: eval, generate (also into a closed pipe) and merge, each its own
    process; the prompt forms generate takes go through the same posttrain.main in this process."""
    run = tmp_path / "run"
    result = lora_launch(
        *tiny["overrides"],
        f"run.dir={run}",
        "train.max_steps=4",
        "optim.lr=3e-3",
        "data.val_split=0.05",
        f"data.cache_dir={tmp_path / 'c'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r][-1]

    def cli(*args):
        out = subprocess.run(
            [CLI, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert "val loss" in cli("eval", f"run.dir={run}")
    # into a pipe whose reader is gone (`lora-launch generate ... | head -1`): exit 1, no BrokenPipeError
    rc, err = into_closed_pipe("generate", f"run.dir={run}", "prompt=cat", "max_new_tokens=4", cwd=tmp_path)
    assert rc == 1 and "BrokenPipeError" not in err and "Traceback" not in err, err[-2000:]
    import json

    result = json.loads((run / "eval.json").read_text())
    assert result["loss"] == pytest.approx(final, rel=1e-5) and result["samples"] == 20
    # prompts are written out as the run's template wrote them in training (llama2 here)
    assert cli("generate", f"run.dir={run}", "prompt=Reverse: cat dog sun", "max_new_tokens=4").startswith(
        "[INST] Reverse: cat dog sun [/INST]"
    )

    def generate(*args):
        capsys.readouterr()
        assert posttrain.main(["generate", f"run.dir={run}", *args, "max_new_tokens=4"]) == 0
        return capsys.readouterr().out

    assert generate("instruction=Reverse:", "input=cat dog sun").startswith("[INST] Reverse:\n\ncat dog sun [/INST]")
    (tmp_path / "chat.json").write_text(
        json.dumps(
            [
                {"role": "user", "content": "Reverse: cat dog"},
                {"role": "assistant", "content": "dog cat"},
                {"role": "user", "content": "Reverse: sun red"},
            ]
        )
    )
    assert generate(f"messages={tmp_path / 'chat.json'}").startswith(
        "[INST] Reverse: cat dog [/INST] dog cat </s><s>[INST] Reverse: sun red [/INST]"
    )
    assert generate("prompt=[INST] raw [/INST]", "template=false").startswith("[INST] raw [/INST]")
    assert "merged model" in cli("merge", f"run.dir={run}")
    assert (run / "merged" / "model.safetensors").is_file() and (run / "adapter").is_dir()


def test_every_checkpoint_is_a_peft_adapter(tiny, tmp_path):
    """checkpoints/step-N/ loads as is with PeftModel.from_pretrained, with the LoRA weights of that step;
    with periodic checkpoints on, the last step is saved too, and its adapter is the final adapter/."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    done = lora_launch(
        *tiny["overrides"],
        f"run.dir={run}",
        "train.max_steps=3",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    final = None
    for step in ("step-2", "step-3"):
        ckpt = run / "checkpoints" / step
        saved = {
            k[len("param/") :]: v
            for k, v in load_file(ckpt / "trainable.safetensors").items()
            if k.startswith("param/")
        }
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), ckpt)
        loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert loaded.keys() == saved.keys()
        for name, value in saved.items():
            torch.testing.assert_close(loaded[name].detach(), value, rtol=0, atol=0)
        final = logits_of(model, IDS)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), run / "adapter")
    torch.testing.assert_close(logits_of(adapter, IDS), final, rtol=1e-5, atol=1e-5)
