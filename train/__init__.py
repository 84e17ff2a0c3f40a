"""LoRA / QLoRA supervised fine-tuning: one distributed loop on accelerate + transformers + PEFT."""
