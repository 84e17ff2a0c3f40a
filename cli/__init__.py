"""`lora-launch`, the front door: one grammar for training, sweeps and the subcommands, above every other package."""
