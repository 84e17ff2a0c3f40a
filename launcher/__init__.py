"""Turns one resolved config into launches: accelerate config, DeepSpeed JSON, per-node commands."""
