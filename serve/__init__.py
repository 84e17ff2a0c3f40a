"""`lora-launch serve`: an OpenAI-compatible HTTP endpoint for a base model and its trained adapters.

adapters.py says what is served (runs, sweep trials, adapter dirs, the base; the `vllm serve` command for the
same names), engine.py generates (one batch, each row with its own adapter), app.py is the HTTP API.
"""
