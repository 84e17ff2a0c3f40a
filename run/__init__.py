"""The run contract: what `lora_launch.launcher` and `lora_launch.train` both depend on, and the only
way they meet. `rundir` is the run directory on disk (status, lock, atomic writes, metrics rewind, a
previous run moved aside); `plan` is the run plan computed once from the config (precision, world
size, global batch, steps, compile mode, ZeRO stage); `process` is how processes of a run end
together (dying with their parent, stop signals); `pruning` is how a sweep's pruner hears a trial's eval
losses and lets it go on."""
