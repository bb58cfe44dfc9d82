"""Full fine-tuning's rules as a profile sees them: the name that selects it, the component learning rates
(sd-scripts' anima_train.py: unset is the base rate, 0 freezes) and the settings it refuses, each naming its key."""

from __future__ import annotations

FULL = "full"  # network.module naming full fine-tuning instead of a network plugin
RATE_KEYS = {"self_attn": "self_attn_lr", "cross_attn": "cross_attn_lr", "mlp": "mlp_lr", "mod": "mod_lr",
             "llm_adapter": "llm_adapter_lr"}


def component_rates(optimizer_cfg) -> dict[str, float]:
    """Each group's rate: its key, or the base rate when unset; 0 freezes."""
    base = optimizer_cfg.learning_rate
    rates = {"base": base}
    for group, key in RATE_KEYS.items():
        value = getattr(optimizer_cfg, key)
        rates[group] = base if value is None else value
    return rates


def full_problems(profile) -> list[str]:
    """What full fine-tuning cannot do (or does not do yet), each naming its key."""
    n, o, m = profile.network, profile.optimizer, profile.memory
    problems = []
    for key in ("dim", "alpha", "dropout", "weights"):
        if getattr(n, key) is not None:
            problems.append(f"network.{key}: a LoRA setting; full fine-tuning trains the weights themselves, remove it")
    if n.args:
        problems.append("network.args: LoRA network args; full fine-tuning takes none (component rates are "
                        "optimizer.self_attn_lr, cross_attn_lr, mlp_lr, mod_lr, llm_adapter_lr)")
    for key in ("unet_lr", "text_encoder_lr"):
        if getattr(o, key) is not None:
            problems.append(f"optimizer.{key}: a LoRA rate; full fine-tuning uses learning_rate and the component rates")
    if o.scale_weight_norms:
        problems.append("optimizer.scale_weight_norms: scales LoRA up/down pairs; full fine-tuning has none")
    if m.fp8_base or m.fp8_base_unet:
        problems.append("memory.fp8_base: stores the frozen weights in fp8; full fine-tuning trains them, turn it off")
    if m.blocks_to_swap and not (o.fused_backward_pass and not o.max_grad_norm):
        problems.append("memory.blocks_to_swap: with full fine-tuning a swapped block's weights are updated while it is "
                        "on the GPU, during backward, which needs optimizer.fused_backward_pass = true with "
                        "max_grad_norm = 0 (Adafactor); set them, or blocks_to_swap = 0")
    if m.blocks_to_swap and profile.training.fsdp:
        problems.append("memory.blocks_to_swap: FSDP already splits the weights over the processes; swapping blocks of "
                        "sharded weights is not supported, set blocks_to_swap = 0 with training.fsdp")
    if all(v == 0 for v in component_rates(o).values()):
        problems.append("optimizer.learning_rate: every group's rate is 0, nothing would be trained")
    return problems


def fsdp_problems(profile, num_processes: int | None = None) -> list[str]:
    """What sharding with FSDP (training.fsdp) needs. ``num_processes``: the run's process count once known (a
    launcher's); before that, a profile's count of 1 may still become a launcher's several."""
    t, o = profile.training, profile.optimizer
    if not t.fsdp:
        return []
    if profile.network.module != FULL:
        return ["training.fsdp: shards the weights of a full fine-tune (network.module = \"full\"); a LoRA run's "
                "network is small and its gradients are summed over the processes instead, remove training.fsdp"]
    problems = []
    if num_processes == 1:
        problems.append("training.fsdp: shards over the run's processes and this run has one; set training.num_processes "
                        "to the number of GPUs (or start it under accelerate launch / torchrun with several)")
    if t.mixed_precision == "fp16":
        problems.append("training.mixed_precision: fp16's gradient scaler does not work on sharded gradients; "
                        "use bf16 with training.fsdp")
    if not _torch_optimizer(o.optimizer_type):
        problems.append(f"optimizer.optimizer_type: {o.optimizer_type} is not a torch.optim optimizer, and only those are "
                        "known to step FSDP's sharded (DTensor) weights (transformers' Adafactor and bitsandbytes' fail on "
                        "them); use AdamW (or another torch.optim class) with training.fsdp")
    if profile.model.compile_blocks:
        problems.append("model.compile_blocks: blocks compile in place, so the compiled code would hold FSDP's weight "
                        "gathers, which is not supported yet; leave compile_blocks unset (eager under training.fsdp)")
    if profile.model.cuda_graphs:
        problems.append("model.cuda_graphs: a captured graph cannot hold FSDP's weight gathers and gradient reductions; "
                        "turn it off with training.fsdp")
    return problems


def _torch_optimizer(name: str) -> bool:
    """True for torch.optim's classes, by bare or dotted name, and the registered names that build them. Neither
    Adafactor steps sharded weights (transformers' mixes plain tensors in, torch's factored statistics need a
    placement change in place), so neither counts."""
    import torch.optim

    if name.lower() in ("adamw", "sgdnesterov"):
        return True
    bare = name.removeprefix("torch.optim.")
    if bare.lower() == "adafactor":
        return False
    return "." not in bare and isinstance(getattr(torch.optim, bare, None), type)
