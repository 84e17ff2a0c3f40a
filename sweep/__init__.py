"""Sweeps: `lora-launch -m`'s trials, each a full launch of its own, scheduled into slots, recorded, pruned and searched."""
