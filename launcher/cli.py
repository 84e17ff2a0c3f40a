"""`lora-launch [overrides]`: compose the config with Hydra, write the run dir, launch training."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from conf.schema import ConfigError, register
from launcher.compose import resolve_run
from launcher.launch import launch_command, printable, run, write_launch_files


def _job(cfg: DictConfig) -> int:
    """One launch (one sweep trial): Hydra's output dir is the run dir."""
    with open_dict(cfg):
        cfg.run.dir = HydraConfig.get().runtime.output_dir
    try:
        resolve_run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(cfg.run.dir)
    files = write_launch_files(cfg, run_dir)
    cmd = launch_command(files)
    print(f"run dir: {run_dir}\nlaunch:  {printable(cmd)}", flush=True)
    rc = run(cmd)
    if rc != 0:
        print(f"error: training exited with code {rc}; see {run_dir}", file=sys.stderr)
        sys.exit(rc)
    return rc


def main() -> None:
    register()
    hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")(_job)()


if __name__ == "__main__":
    main()
