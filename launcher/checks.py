"""Checks that run before any process starts; each failure is one ConfigError line naming the key.

Hostfile format and slot counts are checked where the hostfile is read (launcher/topology.py),
the live-run lock where it is taken (launcher/lock.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

import yaml
from omegaconf import DictConfig

from lora_launch.conf.compose import plain
from lora_launch.conf.schema import ALL_LINEAR, BNB_OPTIMIZERS, SDPA_VARLEN, ConfigError, lora_targets
from lora_launch.launcher.topology import Topology
from lora_launch.run.checkpoints import CheckpointError, choose
from lora_launch.run.compat import config_changes, resume_refusal
from lora_launch.run.plan import RunPlan, warmup_steps
from lora_launch.run.rundir import check_set_aside, missing_folders, short_path
from lora_launch.strategies import strategy_for


def check_global_batch(cfg: DictConfig, plan: RunPlan) -> None:
    """train.global_batch_size, when given, must equal micro_batch_size x grad_accum x world size."""
    want, t = cfg.train.global_batch_size, cfg.train
    if want is None or plan.global_batch == want:
        return
    got, world = plan.global_batch, plan.world_size
    per_accum = t.micro_batch_size * world
    hint = (
        f"set train.grad_accum={want // per_accum}"
        if want % per_accum == 0
        else f"it must be a multiple of micro_batch_size x world = {per_accum}"
    )
    raise ConfigError(
        f"train.global_batch_size={want} but micro_batch_size {t.micro_batch_size} x grad_accum "
        f"{t.grad_accum} x world {world} = {got}; {hint}"
    )


def check_qlora_sharded(cfg: DictConfig, plan: RunPlan) -> None:
    """QLoRA under ZeRO-3 or FSDP2 needs the packed 4-bit weights stored in the compute dtype."""
    q = cfg.quant
    if q.mode == "nf4" and plan.shards_params and q.storage_dtype != q.compute_dtype:
        # ZeRO-3 and FSDP2 shard and gather floating-point parameters; uint8-packed weights break that
        which = strategy_for(cfg).label(plan)
        raise ConfigError(
            f"quant.storage_dtype={q.storage_dtype} with distributed={cfg.distributed.name}: "
            f"{which} needs it equal to quant.compute_dtype, set quant.storage_dtype={q.compute_dtype}"
        )


def check_strategy(cfg: DictConfig, plan: RunPlan) -> None:
    """What the strategy cannot run on this launch's shape or installation (FSDP2: torch's fully_shard, a
    distributed.replicate that divides the world size)."""
    for problem in strategy_for(cfg).launch_problems(cfg, plan):
        raise ConfigError(problem)


def check_nf4(cfg: DictConfig) -> None:
    """quant=nf4 needs a bitsandbytes that can quantise here (on CPU too; no GPU needed)."""
    if cfg.quant.mode != "nf4":
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except Exception as e:  # any failure of the library itself means nf4 cannot run here
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"quant=nf4: bitsandbytes cannot quantise on {device} here ({type(e).__name__}: {first}); use quant=none"
        ) from None


def check_extras(cfg: DictConfig) -> None:
    """What the config asks for is installed: DeepSpeed, bitsandbytes, wandb and MLflow are extras."""
    needs = []
    strategy = strategy_for(cfg)
    if strategy.needs:
        module, extra = strategy.needs
        needs.append((module, extra, f"distributed={cfg.distributed.name}", "or use distributed=ddp"))
    if cfg.quant.mode == "nf4":
        needs.append(("bitsandbytes", "qlora", "quant=nf4", "or use quant=none"))
    if cfg.optim.name in BNB_OPTIMIZERS:
        needs.append(("bitsandbytes", "qlora", f"optim.name={cfg.optim.name}", "or use optim.name=adamw_torch"))
    if cfg.logging.wandb.mode != "disabled":
        needs.append(
            ("wandb", "wandb", f"logging.wandb.mode={cfg.logging.wandb.mode}", "or set logging.wandb.mode=disabled")
        )
    if cfg.logging.mlflow.enabled:
        needs.append(("mlflow", "mlflow", "logging.mlflow.enabled=true", "or set logging.mlflow.enabled=false"))
    for module, extra, key, other in needs:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} needs {module}: `pip install 'lora-launch[{extra}]'` (or {module}), {other}")


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def check_model(cfg: DictConfig) -> None:
    """model.path is a model directory, or a hub id readable here; every lora.target_modules name exists.

    Read from the model's config alone (the weights stay where they are). An online hub id is left to
    the download, which names it if it does not exist.
    """
    m = cfg.model
    if not m.random_init:
        path = Path(os.path.expanduser(m.path))
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"model.path={m.path}: no config.json there; give a model directory "
                    "(what save_pretrained writes) or a hub id OWNER/NAME"
                )
        elif not _HUB_ID.match(m.path):
            raise ConfigError(f"model.path={m.path}: no such directory, and not a hub id (OWNER/NAME)")
        elif not _offline():
            return
    from lora_launch.launcher.preview import model_config

    try:
        config = model_config(cfg)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        if not m.random_init and Path(os.path.expanduser(m.path)).is_dir():
            raise ConfigError(
                f"model.path={m.path}: its config.json cannot be read ({first}); fix or replace "
                "it (save_pretrained writes it)"
            ) from None
        raise ConfigError(
            f"model.path={m.path}: cannot read its config here ({first}); with HF_HUB_OFFLINE=1 "
            "a hub model must already be in the local cache: download it once, or give a "
            "local directory"
        ) from None
    if not m.random_init and Path(os.path.expanduser(m.path)).is_dir():
        check_weights(m.path, Path(os.path.expanduser(m.path)))
    model = _meta_model(config, str(cfg.model.attn_implementation))
    if model is not None:
        check_lora_targets(model, config.model_type, lora_targets(cfg))


def _meta_model(config, attn_implementation: str):
    """The model of `config` on the meta device (no memory, no weights), built with the attention
    implementation asked for, which transformers checks here (installed kernels, architecture support);
    None for an architecture this transformers cannot build (PEFT and the load will say)."""
    import torch
    from transformers import AutoModelForCausalLM

    if attn_implementation == SDPA_VARLEN:  # sdpa with packed rows through torch's own varlen kernel
        attn_implementation = "sdpa"
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "attn" in str(e).lower() or "attention" in str(e).lower() or attn_implementation in str(e):
            raise ConfigError(
                f"model.attn_implementation={attn_implementation}: not usable here ({first}); "
                "use sdpa or eager, or install what it needs"
            ) from None
        return None


def check_weights(key_value: str, path: Path) -> None:
    """A local model directory holds safetensors weights (the only format loaded)."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f"it has only {other[:3]}: convert them to safetensors (save_pretrained(..., safe_serialization=True)), "
        "which is the only format loaded"
        if other
        else "give the directory save_pretrained wrote"
    )
    raise ConfigError(f"model.path={key_value}: no *.safetensors weights there; {hint}")


def check_lora_targets(model, model_type: str, targets) -> None:
    """Each lora.target_modules name is a module of the model (as PEFT matches: the name's last parts)."""
    import torch

    if targets == ALL_LINEAR:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear) and not n.endswith("lm_head")
            }
        )
        raise ConfigError(
            f"lora.target_modules: {missing} not in this {model_type} model; its linear "
            f"layers are {linear} (or use lora.target_modules={ALL_LINEAR})"
        )


def check_run_dir_writable(run_dir: Path) -> None:
    """The run dir exists (or can be made) and takes a file; dirs made only to find out are removed again.

    Every node of a multi-node launch checks the same run.dir at once, on a shared filesystem the same folder: a
    peer may remove the dirs it made for its own check between this one's mkdir and its file. That vanishing is
    looked at again, a few times, rather than refused."""
    run_dir = Path(run_dir)
    made: list[Path] = []
    try:
        for attempt in range(PROBES):
            made += [d for d in missing_folders(run_dir) if d not in made]
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test."):
                    pass
                return
            except FileNotFoundError:
                if attempt == PROBES - 1:
                    raise
    except OSError as e:
        raise ConfigError(
            f"run.dir={short_path(run_dir)} is not writable ({e.strerror}); choose another run.dir"
        ) from None
    finally:
        for d in sorted(made, key=lambda d: len(d.parts), reverse=True):  # innermost first
            try:
                d.rmdir()  # only while empty: a peer's launch may be writing there by now
            except OSError:
                continue


PROBES = 5  # a folder removed under the check this many times running is not a peer's probe


def check_multinode_run_dir(cfg: DictConfig, topo: Topology, run_dir_given: bool) -> None:
    """Every node composes its own config, so a multi-node launch needs a run.dir that is the same on all."""
    if topo.num_machines > 1 and cfg.launcher.name != "slurm" and not run_dir_given:
        raise ConfigError(
            f"launcher={cfg.launcher.name} on {topo.num_machines} nodes: give run.dir=PATH (the same "
            "path on every node, ideally shared); the timestamped default differs per node"
        )


def _config_changes(old: dict, cfg: DictConfig) -> list[str]:
    """Keys of cfg that differ from an earlier run's resolved config, beyond what may change."""
    return config_changes(old, plain(cfg), list(cfg.resume.allow_changes))


def check_resume_config(cfg: DictConfig) -> None:
    """The checkpoint a resume would load is complete (its files checksummed), and was written under this
    config: refused here otherwise, before this launch rewrites anything in the run dir (training verifies
    again and checks the data and tokenizer hashes)."""
    try:  # complete and checksummed, as training will find it; a refusal now leaves the run dir as it is
        found = choose(Path(cfg.run.dir), cfg.resume.mode, say=lambda message: print(f"checkpoint: {message}"))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if found is None:
        return
    path, manifest = found
    diff = _config_changes(manifest["config"], cfg)
    if diff:
        raise ConfigError(resume_refusal(path, diff))


def check_finished_config(cfg: DictConfig) -> None:
    """A finished run asked to run again under another config is refused, not silently skipped."""
    from omegaconf import OmegaConf

    try:
        old = plain(OmegaConf.load(Path(cfg.run.dir) / "config.yaml"))
    except (OSError, ValueError, yaml.YAMLError):
        return  # no readable config.yaml: nothing to compare with
    diff = _config_changes(old, cfg)
    if diff:
        raise ConfigError(
            f"{cfg.run.dir} holds a finished run with another config ({'; '.join(diff)}); "
            "use another run.dir, or resume.mode=never to start over there"
        )


def check_data(cfg: DictConfig) -> None:
    """Read, format and tokenise the data into the cache now, before any training process starts: a data
    error is one line before launch, and the ranks read what this leaves in the cache."""
    from lora_launch.data.samples import DataError, prepare

    try:
        prepare(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None


def check_attention_device(cfg: DictConfig, plan: RunPlan) -> None:
    """flex_attention trains on GPUs only (torch has no backward for it on CPU)."""
    if str(cfg.model.attn_implementation) == "flex_attention" and not plan.on_gpu:
        raise ConfigError(
            "model.attn_implementation=flex_attention: torch has no backward for it on CPU; use sdpa or eager here"
        )


def check_own_configs(cfg: DictConfig, plan: RunPlan) -> None:
    """A user's accelerate config and DeepSpeed JSON read and merged now: a conflict is one line before launch."""
    from lora_launch.launcher.accelerate_config import accelerate_config
    from lora_launch.run.own_configs import merged_accelerate, merged_deepspeed

    ours = strategy_for(cfg).deepspeed_config(cfg, plan)
    if cfg.distributed.deepspeed_config and ours is None:
        raise ConfigError(
            f"distributed.deepspeed_config={cfg.distributed.deepspeed_config} with "
            f"distributed={cfg.distributed.name}: choose a DeepSpeed option (zero2, zero3, ...)"
        )
    if ours is not None:
        merged = merged_deepspeed(ours, cfg.distributed.deepspeed_config)
        if (merged.get("compile") or {}).get("deepcompile") and not plan.on_gpu:
            raise ConfigError(
                f"compile.deepcompile in distributed.deepspeed_config={cfg.distributed.deepspeed_config}: "
                "DeepSpeed's DeepCompile runs on CUDA GPUs only; set it false to run here"
            )
    merged_accelerate(accelerate_config(cfg, plan, "ds_config.json"), cfg.launcher.accelerate_config)


def check_before_launch(cfg: DictConfig, topo: Topology, plan: RunPlan, run_dir_given: bool) -> None:
    """Everything that can be known wrong before a process starts."""
    check_multinode_run_dir(cfg, topo, run_dir_given)
    check_resume_config(cfg)
    if cfg.resume.mode == "never":  # before anything is moved or written: the user's files stay where they are
        check_set_aside(Path(cfg.run.dir))
    check_global_batch(cfg, plan)
    check_own_configs(cfg, plan)
    check_extras(cfg)
    check_model(cfg)
    check_attention_device(cfg, plan)
    check_qlora_sharded(cfg, plan)
    check_strategy(cfg, plan)
    check_nf4(cfg)
    check_run_dir_writable(Path(cfg.run.dir))


def warmup_warning(cfg: DictConfig) -> str | None:
    """One line when the warm-up lasts the whole run (train.max_steps set and no longer than it): the learning
    rate then never reaches optim.lr. None otherwise (a run of epochs learns its step count from the data)."""
    steps = cfg.train.max_steps
    warmup = warmup_steps(cfg.optim, steps)
    if steps <= 0 or warmup < steps:
        return None
    given = (
        f"optim.warmup_steps={warmup}"
        if cfg.optim.warmup_steps
        else f"optim.warmup_ratio={cfg.optim.warmup_ratio} ({warmup} steps)"
    )
    return (
        f"{given} >= train.max_steps={steps}: the learning rate never reaches optim.lr={cfg.optim.lr}; "
        "lower optim.warmup_steps (or optim.warmup_ratio) or raise train.max_steps"
    )


def run_dir_given(overrides: list[str]) -> bool:
    """Whether the command line set run.dir (or hydra.run.dir) itself."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return bool(keys & {"run.dir", "hydra.run.dir"})
