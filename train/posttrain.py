"""After training: `lora-launch generate|merge|eval run.dir=RUN [key=value ...]`.

Each reads RUN/config.yaml (the run's resolved config) and RUN/adapter (the trained LoRA); the
arguments are typed in conf/args.py (`lora-launch generate --help` lists them):

    lora-launch generate run.dir=RUN prompt="[INST] Where is Italy? [/INST]" [sample=true]
        [max_new_tokens=64 temperature=0.7 top_p=0.9 seed=0 template=false]
    lora-launch merge run.dir=RUN [out=RUN/merged dtype=bfloat16]
    lora-launch eval run.dir=RUN [split=val|train max_batches=-1]

`merge` writes a standalone model (safetensors) that `AutoModelForCausalLM.from_pretrained`
loads; a QLoRA run is merged into its dequantized base, the weights it was trained against.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from lora_launch.conf.args import EvalArgs, GenerateArgs, MergeArgs
from lora_launch.conf.dtypes import torch_dtype
from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.run.rundir import atomic_dir, write_json
from lora_launch.train.evaluate import complete, loss_sum


def load_run(run_dir: str) -> DictConfig:
    """The run's resolved config, after checking that the run has a trained adapter."""
    from lora_launch.conf.schema import load

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"run.dir={run_dir}: no config.yaml here; is this a lora-launch run directory?")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"run.dir={run_dir}: no trained adapter (adapter/adapter_config.json); has the run finished?")
    return load(str(run / "config.yaml"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(cfg: DictConfig, run_dir: Path, dequantize_to: torch.dtype | None = None):
    """(base + adapter as a PeftModel in eval mode, tokenizer). With `dequantize_to`, a 4-bit
    base is dequantized to that dtype first (what merging needs)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lora_launch.train.model import load_base_model

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = load_base_model(cfg, device())
    if dequantize_to is not None:
        if cfg.quant.mode == "nf4":
            base = base.dequantize(dtype=dequantize_to)
        base = base.to(dequantize_to)
    base.config.use_cache = True
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    return model, tok


# ---- generate ---------------------------------------------------------------------------------


def generate(args: GenerateArgs) -> int:
    """Print the completion of `prompt` by base + adapter."""
    from lora_launch.data.samples import as_trained
    from lora_launch.data.templates import prompt_text

    run = Path(args.run.dir)
    cfg = load_run(args.run.dir)
    message = _message(args, cfg)  # before loading the model: a bad messages file is said at once
    model, tok = load_model(cfg, run)
    if args.template:
        prompt = prompt_text(as_trained(cfg.data, _data_report(run)), tok, message, input_text=args.input)
    else:
        prompt = message if isinstance(message, str) else message[-1]["content"]
    max_new = args.max_new_tokens or cfg.sample.max_new_tokens or 64
    text = complete(
        model, tok, prompt, max_new, sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    bos = tok.bos_token or ""
    print((prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt) + text, flush=True)
    return 0


def _message(args: GenerateArgs, cfg) -> str | list[dict]:
    """What to complete: `messages` (a JSON file), `instruction`, `prompt`, or the run's sample.prompt."""
    if args.messages is not None:
        try:
            messages = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"messages={args.messages}: cannot read it as JSON ({e})") from None
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")
                for m in messages
            )
            and messages[-1]["role"] == "user"
        ):
            raise UserError(
                f"messages={args.messages}: give a JSON list of {{role: system|user|assistant, "
                "content}} ending with a user turn"
            )
        return messages
    if args.instruction is not None:
        return args.instruction
    return args.prompt if args.prompt is not None else cfg.sample.prompt


def _data_report(run: Path) -> dict:
    """The run's data report (which format and template it trained with); {} when it has none."""
    try:
        return json.loads((run / "data_report.json").read_text())
    except (OSError, ValueError):
        return {}


# ---- merge ------------------------------------------------------------------------------------


def merge(args: MergeArgs) -> int:
    """Write base + adapter as one model (safetensors + tokenizer), replacing `out` only when complete."""
    run = Path(args.run.dir)
    cfg = load_run(args.run.dir)
    out = Path(args.out or run / "merged")
    model, tok = load_model(cfg, run, dequantize_to=torch_dtype(args.dtype))
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"merged model ({args.dtype}): {out}", flush=True)
    return 0


# ---- eval -------------------------------------------------------------------------------------


def eval_loss(model, samples, micro: int, pad_id: int, max_batches: int = -1) -> tuple[float, int]:
    """Mean token loss of `model` over `samples` (as the training loop evaluates), and the token count."""
    total, count = loss_sum(model, samples, micro, pad_id, model.device, max_batches=max_batches)
    return total / max(count, 1), count


def evaluate(args: EvalArgs) -> int:
    """Print (and write RUN/eval.json) the eval loss and perplexity of base + adapter."""
    from lora_launch.data.samples import build_splits

    run = Path(args.run.dir)
    cfg = load_run(args.run.dir)
    split = str(args.split)
    model, tok = load_model(cfg, run)
    with open_dict(cfg):
        cfg.data.packing = False  # evaluate whole samples, as the loop does for val
    samples = getattr(build_splits(cfg, tok, report=False), split)
    if not len(samples):
        raise UserError(
            f"run.dir={run}: the run has no {split} samples (trained with data.val_split=0 and no data.val_split_name?)"
        )
    loss, tokens = eval_loss(model, samples, cfg.train.micro_batch_size, tok.pad_token_id, args.max_batches)
    result = {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "samples": len(samples),
        "tokens": tokens,
    }
    print(
        f"{split} loss {loss:.4f}  perplexity {result['perplexity']:.3f}  "
        f"({len(samples)} samples, {tokens} target tokens)",
        flush=True,
    )
    write_json(run / "eval.json", result, indent=2)
    return 0


COMMANDS = {"generate": generate, "merge": merge, "eval": evaluate}


@reports_user_errors
def main(argv: list[str]) -> int:
    """Run one subcommand: argv = [command, key=value, ...]; errors are one line and exit 2."""
    from lora_launch.conf.args import parse_args
    from lora_launch.run.process import exit_on_closed_stdout
    from lora_launch.run.quiet import quiet_third_party

    quiet_third_party()  # its own process (lora-launch execs it): the launcher's filters do not carry over
    command, rest = argv[0], argv[1:]
    try:
        code = COMMANDS[command](parse_args(command, rest))
        sys.stdout.flush()  # here, not at exit, so a reader gone away (`... | head -1`) is caught below
        return code
    except BrokenPipeError:
        exit_on_closed_stdout()


if __name__ == "__main__":  # `lora-launch generate|merge|eval` runs this module as its own process
    sys.exit(main(sys.argv[1:]))
