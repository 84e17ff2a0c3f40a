"""Shared fixtures: a tiny random Llama + tokenizer + jsonl built once per test session, and helpers
to run the real `lora-launch` / `python -m train` commands in subprocesses."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star", "rain", "leaf"]


def _make_tiny(root: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    rows = []
    for _ in range(400):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": "Reverse: " + " ".join(words), "output": " ".join(reversed(words))})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"[INST] {r['instruction']} [/INST] {r['output']}" for r in rows], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, data


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny random Llama (model dir with tokenizer) and a 400-row 'reverse words' jsonl."""
    model_dir, data = _make_tiny(tmp_path_factory.mktemp("tiny"))
    return {"model": model_dir, "data": data,
            "overrides": [f"model.path={model_dir}", f"data.path={data}", "data.source=local",
                          "train.seq_len=64", "logging.progress_bar=false", "sample.max_new_tokens=8"]}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def lora_launch(*overrides: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `lora-launch` entry point (as the console script does) and capture its output."""
    cmd = [sys.executable, "-c", "from launcher.cli import main; main()", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
