"""Tokenizer, base model (pre-trained, random or 4-bit) and the PEFT LoRA wrapper."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lora_launch.conf.dtypes import torch_dtype
from lora_launch.conf.grad_ckpt import read as read_grad_ckpt
from lora_launch.conf.schema import lora_targets, plain, quant_kernel
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for


def _quantization_config(cfg: DictConfig):
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_quant_storage=torch_dtype(q.storage_dtype),
    )


def load_base_model(
    cfg: DictConfig, device: torch.device, plan: RunPlan | None = None, draw: torch.device | None = None
):
    """The frozen base causal LM, on `device`, its weights in the plan's dtype.

    `draw`: where a random_init model's weights are drawn, when that is another kind of device: FSDP2's rank
    0 keeps the whole model on its CPU but draws it on its GPU one tensor at a time (a CPU draws a 7B in
    minutes). Those weights are normal(0, initializer_range) as transformers draws them, but not the same
    numbers as a `ddp` run's.

    On the meta device it is the model's shape alone, no weights read or drawn (buffers computed from the
    config, such as rotary frequencies, are real): FSDP2's ranks other than 0 build this, shard it, and
    receive their shards from rank 0 (lora_launch.train.fsdp).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_launch.train.attention import register

    register()
    plan = plan or RunPlan.for_this_process(cfg)
    dtype = torch_dtype(plan.model_dtype)
    common = dict(attn_implementation=str(cfg.model.attn_implementation))
    if device.type == "meta":
        from accelerate import init_empty_weights

        if cfg.quant.mode == "nf4":
            raise ValueError("a 4-bit base is loaded on every rank, not built on the meta device")
        config = (
            _random_config(cfg)
            if cfg.model.random_init
            else AutoConfig.from_pretrained(
                cfg.model.path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            )
        )
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, **common
            )
        model.tie_weights()  # init_empty_weights re-creates each parameter it registers, which undid the tying
        model.config.use_cache = False
        return model
    if cfg.model.random_init:
        config = _random_config(cfg)
        torch.manual_seed(cfg.seed)
        if cfg.quant.mode == "nf4":
            model = _random_4bit(cfg, config, device, common)
        elif draw is not None and draw.type != device.type:
            model = _random_drawn_on(config, dtype, draw, device, common)
        else:
            with device:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    else:
        kwargs = dict(
            dtype=dtype,
            revision=cfg.model.revision,
            use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code,
            **common,
        )
        if cfg.quant.mode == "nf4":
            kwargs["quantization_config"] = _quantization_config(cfg)
            kwargs["dtype"] = torch_dtype(cfg.quant.compute_dtype)
            if not strategy_for(cfg).places_weights(cfg):  # ZeRO-3 places (and shards) the weights itself
                kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kwargs)
        if cfg.quant.mode != "nf4" or strategy_for(cfg).places_weights(cfg):
            model.to(device)
    if cfg.quant.mode == "nf4" and device.type == "cpu":
        _keep_cpu_4bit_trainable(model)
    model.config.use_cache = False
    return model


def _random_config(cfg: DictConfig):
    """The transformers config of a model built from `model.arch` (model.random_init=true)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**plain(cfg.model.arch))


def _random_4bit(cfg: DictConfig, config, device: torch.device, common: dict):
    """A random-weight model whose linear layers are nf4, as from_pretrained with quant=nf4 gives.

    Built one layer at a time: each linear weight is drawn on `device` in the compute dtype, quantised,
    and freed before the next, so a shape whose bf16 weights would not fit the device (a 70B on one GPU)
    still loads. lm_head, embeddings and norms stay unquantised, as transformers leaves them.
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    q = cfg.quant
    compute = torch_dtype(q.compute_dtype)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=compute, **common)
    std = getattr(config, "initializer_range", 0.02)
    skip = set(model._keep_in_fp32_modules or []) | {"lm_head"}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name in skip:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute,
                compress_statistics=q.double_quant,
                quant_type="nf4",
                quant_storage=torch_dtype(q.storage_dtype),
                device="meta",
            )
            weight = torch.empty(child.out_features, child.in_features, dtype=compute, device=device).normal_(0, std)
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=q.double_quant,
                quant_type="nf4",
                quant_storage=layer.weight.quant_storage,
                module=layer,
            ).to(device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=compute, device=device))
            setattr(parent, name, layer)
            del weight
    _draw_meta_parameters(model, std, device, device)  # what is left: embeddings, norms, lm_head
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.is_loaded_in_4bit = True  # what PEFT and prepare_model_for_kbit_training look for
    model.config.quantization_config = _quantization_config(cfg)
    return model


def _random_drawn_on(config, dtype: torch.dtype, draw: torch.device, keep: torch.device, common: dict):
    """A random-weight model held on `keep`, each tensor drawn on `draw` and moved: the device draws in
    milliseconds what a CPU draws in minutes, and holds one tensor at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **common)
    _draw_meta_parameters(model, getattr(config, "initializer_range", 0.02), draw, keep)
    model.tie_weights()  # each parameter was replaced: tie the output embedding to the input again (if tied)
    return model


def _draw_meta_parameters(model, std: float, draw: torch.device, keep: torch.device) -> None:
    """Give every parameter still on the meta device a value as transformers initialises Llama-style models
    (matrices normal(0, std), norm scales 1, biases 0), drawn on `draw` and kept on `keep`, frozen; buffers
    move to `keep`."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            value = torch.empty(param.shape, dtype=param.dtype, device=draw)
            if param.ndim == 1:
                value.fill_(1.0 if name == "weight" else 0.0)  # norm scales and biases
            else:
                value.normal_(0, std)
            setattr(module, name, torch.nn.Parameter(value.to(keep), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(keep)


def _keep_cpu_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first forward in eval mode (the eval at step 0) converts each
    Linear4bit weight to a packed inference layout whose kernel has no autograd: every later
    training step then gets zero gradients, silently.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_lora(cfg: DictConfig, model):
    """Wrap the base model with trainable LoRA adapters; everything else stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quant.mode == "nf4" and quant_kernel(cfg) == "torch":  # training only: generate and serve keep bnb's
        from lora_launch.train.nf4 import use_torch_matmul

        use_torch_matmul(model, torch_dtype(cfg.quant.compute_dtype))
    # which layers recompute is set per layer once the weights are placed (lora_launch.train.activations)
    checkpointing = read_grad_ckpt(cfg.train.grad_ckpt).on
    if cfg.quant.mode == "nf4" and cfg.quant.upcast_frozen:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # inputs must require grad for checkpointed blocks to backprop into the adapters
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(cfg),
        bias=str(cfg.lora.bias),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def decoder_layer_classes(model) -> list[type]:
    """The classes of the model's decoder layers: those the causal LM names in `_no_split_modules`, else every
    `*DecoderLayer` (none where it has neither)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}
    return sorted(found, key=lambda c: c.__name__)
