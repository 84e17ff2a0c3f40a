"""What `lora-launch serve` serves: one base model and named adapters, from run dirs, sweep dirs and adapter dirs.

A request's `model` field picks an adapter by its run's name: a run dir's name, a sweep trial's dir name
(`optim.lr=0.001`), or for a bare adapter dir its own name (`RUN/checkpoints/step-40` is `RUN-step-40`); the
base model answers under its own name (a local dir's name, or the hub id). Every run must have been trained on
the same base. Nothing here loads weights: a bad directory is one line before anything starts. The same names
make the `vllm serve` command line (engine=vllm).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict

from lora_launch.conf.errors import UserError
from lora_launch.conf.schema import ConfigError
from lora_launch.run.process import replace_process
from lora_launch.run.rundir import read_status
from lora_launch.train.posttrain import load_run

API_KEY_ENV = "LORA_LAUNCH_API_KEY"
WEIGHTS = "adapter_model.safetensors"  # adapters load from safetensors only, never from a pickle


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path  # the PEFT adapter directory
    run: Path | None  # the run it was trained in (config.yaml: its template, how its base loads), if known
    rank: int  # the largest LoRA rank in it (vLLM sizes its adapter slots by the largest)


@dataclass
class Served:
    base: str  # base model dir or hub id
    base_name: str
    adapters: list[Adapter]
    configs: dict[Path, DictConfig]  # each run's resolved config
    base_cfg: DictConfig | None  # a run's config with model.path = base: loads the base as trained; None: plainly


def resolve(args) -> Served:
    """The base model and the adapters `args` (conf/args.py ServeArgs) name, checked on disk."""
    check_limits(args)
    check_access(args)
    runs = [Path(d) for d in ([args.run.dir] if args.run.dir else []) + list(args.runs)]
    if args.sweep:
        runs += finished_trials(Path(args.sweep))
    configs = {run.resolve(): load_run(str(run)) for run in runs}
    adapters = [_adapter(run / "adapter", run.resolve().name, run.resolve()) for run in runs]
    adapters += [_bare_adapter(Path(p)) for p in args.adapters]
    for a in adapters:
        if a.run is not None and a.run not in configs:
            configs[a.run] = _config(a.run)
    base, base_cfg = _base(args, adapters, configs)
    base_name = Path(base).resolve().name if Path(base).exists() else base
    names = [base_name] + [a.name for a in adapters]
    for i, name in enumerate(names):
        if name in names[:i]:
            paths = [str(a.path) for a in adapters if a.name == name] + ([base] if name == base_name else [])
            raise UserError(
                f"serve: two models are named {name!r} ({', '.join(paths)}); serve them from "
                "directories with different names"
            )
    return Served(base, base_name, adapters, configs, base_cfg)


def check_limits(args) -> None:
    """The request limits and the port are numbers a server can use."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"serve: port={args.port}: give 0..65535 (0: a free port)")
    for key in (
        "max_tokens",
        "max_prompt_tokens",
        "max_body_bytes",
        "max_concurrent",
        "max_batch",
        "shutdown_timeout_s",
    ):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"serve: {key}={value}: give a number >= 1")


def check_access(args) -> None:
    """No API key is asked only on a loopback address, unless allow_no_key=true says so."""
    if api_key(args) or args.allow_no_key or is_loopback(args.host):
        return
    raise UserError(
        f"serve: host={args.host} without an API key lets anyone who reaches the port use the models; "
        f"set LORA_LAUNCH_API_KEY (or api_key=), or give allow_no_key=true to serve openly"
    )


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's own loopback address (only local clients reach it)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def finished_trials(sweep: Path) -> list[Path]:
    """The sweep's trial dirs whose training finished, by name; the others are named on stderr and left out."""
    if not sweep.is_dir():
        raise UserError(f"sweep={sweep}: not a directory; give a sweep dir (sweeps/sweep-...)")
    trials = sorted(d for d in sweep.iterdir() if (d / "config.yaml").is_file())
    done = [
        d
        for d in trials
        if read_status(d).get("state") == "finished" and (d / "adapter" / "adapter_config.json").is_file()
    ]
    for d in trials:
        if d not in done:
            print(f"serve: leaving out trial {d.name} ({read_status(d).get('state', 'no status')})", file=sys.stderr)
    if not done:
        raise UserError(f"sweep={sweep}: no finished trial (a trial dir with status.json 'finished' and adapter/)")
    return done


def _adapter(path: Path, name: str, run: Path | None) -> Adapter:
    """A PEFT adapter dir that loads from safetensors, with its largest rank."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a PEFT adapter directory (adapter_config.json: {e})") from None
    if not (path / WEIGHTS).is_file():
        raise UserError(f"{path}: no {WEIGHTS} (adapters load from safetensors only)")
    if config.get("use_dora"):
        raise UserError(
            f"{path}: a DoRA adapter, which PEFT cannot mix into shared batches; merge it into its "
            "base and serve that as base=DIR"
        )
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return Adapter(name, path.resolve(), run, int(max(ranks)))


def _bare_adapter(path: Path) -> Adapter:
    """An adapter dir given as such: RUN/adapter, RUN/checkpoints/step-N, or any PEFT adapter dir."""
    path = path.resolve()
    if path.name == "adapter":
        run, name = path.parent, path.parent.name
    elif path.parent.name == "checkpoints":
        run, name = path.parent.parent, f"{path.parent.parent.name}-{path.name}"
    else:
        run, name = None, path.name
    return _adapter(path, name, run if run is not None and (run / "config.yaml").is_file() else None)


def _config(run: Path) -> DictConfig:
    """A run's config without asking for its final adapter (a checkpoint of a run still training)."""
    from lora_launch.conf.schema import load

    try:
        return load(str(run / "config.yaml"))
    except Exception as e:  # noqa: BLE001 - a config this version cannot read: one line, as for any bad dir
        raise UserError(f"{run / 'config.yaml'}: cannot read it ({str(e).splitlines()[0]})") from None


def _base(args, adapters: list[Adapter], configs: dict[Path, DictConfig]) -> tuple[str, DictConfig | None]:
    """The base model, and the config that loads it as the runs trained on it (their quantisation)."""
    trained_on = {(str(c.model.path), str(c.quant.mode)): run for run, c in configs.items()}
    if len(trained_on) > 1:
        (a, run_a), (b, run_b) = list(trained_on.items())[:2]
        raise UserError(
            f"serve: {run_a.name} and {run_b.name} were trained on different bases "
            f"(model.path={a[0]} quant={a[1]}; model.path={b[0]} quant={b[1]}); serve one base at a time"
        )
    base = args.base or next((path for path, _ in trained_on), None)
    if base is None:
        named = {_adapter_base(a) for a in adapters} - {None}
        if len(named) != 1:
            raise UserError(
                "serve: give run.dir=RUN, runs=[...], sweep=DIR or adapters=[...], and base=MODEL "
                "where no run names the base (a merged model serves alone as base=DIR)"
            )
        base = named.pop()
    if not configs:
        return base, None
    cfg = copy.deepcopy(configs[next(iter(trained_on.values()))])
    with open_dict(cfg):
        cfg.model.path = base
    return base, cfg


def _adapter_base(adapter: Adapter) -> str | None:
    return json.loads((adapter.path / "adapter_config.json").read_text()).get("base_model_name_or_path")


def api_key(args) -> str | None:
    """The key every /v1 request must carry: api_key=, else $LORA_LAUNCH_API_KEY; None: no key asked."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


# ---- engine=vllm ------------------------------------------------------------------------------

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM takes


def vllm_command(served: Served, args) -> list[str]:
    """`vllm serve` for the same base, adapters and names (the API key goes in VLLM_API_KEY, not argv)."""
    cmd = [
        "vllm",
        "serve",
        served.base,
        "--served-model-name",
        served.base_name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--max-num-seqs",
        str(args.max_batch),
        "--generation-config",
        "vllm",
    ]  # OpenAI's defaults (temperature 1), not the model's, as engine=transformers
    if served.adapters:
        rank = max(a.rank for a in served.adapters)
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(len(served.adapters)),
            "--max-lora-rank",
            str(next((r for r in VLLM_RANKS if r >= rank), rank)),
            "--lora-modules",
            *(_lora_module(a, served.base_name) for a in served.adapters),
        ]
    if served.base_cfg is not None and served.base_cfg.quant.mode == "nf4":
        cmd += ["--quantization", "bitsandbytes"]  # the 4-bit base the adapters were trained against
    return cmd


def _lora_module(adapter: Adapter, base_name: str) -> str:
    """`name=path`, or vLLM's JSON form where the name or path holds `=` or `,` (a sweep trial's name)."""
    if not set("=,") & set(adapter.name + str(adapter.path)):
        return f"{adapter.name}={adapter.path}"
    return json.dumps({"name": adapter.name, "path": str(adapter.path), "base_model_name": base_name})


def exec_vllm(served: Served, args) -> int:
    """Replace this process with `vllm serve`; one line when vLLM is not installed."""
    import shutil

    if shutil.which("vllm") is None:
        raise UserError(
            "serve: engine=vllm needs the `vllm` command (`pip install vllm`, on a GPU machine); "
            "or use engine=transformers"
        )
    cmd = vllm_command(served, args)
    env = dict(os.environ)
    key = api_key(args)
    if key:
        env["VLLM_API_KEY"] = key
    print(shlex.join(cmd), flush=True)
    replace_process(cmd, env)
