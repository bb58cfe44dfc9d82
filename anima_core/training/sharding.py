"""FSDP2 for full fine-tuning over several processes (``training.fsdp``): the DiT's weights, their gradients and
the optimizer state are split across the processes, each holding about 1/N; a block's whole weights exist only
while that block runs (gathered before, freed after), and whole tensors are gathered only for a save.

The sharding is torch's own (``torch.distributed.fsdp.fully_shard``, per DiT block, the LLM adapter, then the
rest), on the process group accelerate's ``PartialState`` set up, as accelerate's FSDP2 plugin applies it with a
transformer-block wrap policy. It is called directly because accelerate enables FSDP only for GPU process groups,
and the CPU (gloo) runs of the tests must take the very path a GPU run takes.

What keeps a sharded run one run (training/distributed.py says it for data parallelism):
- Each process's loss is its share of the global batch, so the gradient wanted is the processes' sum. FSDP's
  reduce-scatter averages (gloo has no pre-scaled sum to undo that), so ``sum_gradients`` multiplies each local
  shard by N afterwards: exact for N a power of two, one rounding otherwise.
- Every forward gathers weights from every process, so processes must run the same forwards: a process whose
  slice of a batch is empty runs the DiT on a dummy input with a zero loss (``empty_forward_backward``), and
  previews and the validation loss run on every process (only the main one writes them).
- States hold the whole tensors (gathered to the main process, keyed by parameter name), so a state saved by a
  sharded run resumes with or without sharding, and the other way round; loading hands each process its shards.
"""

from __future__ import annotations

import torch
from torch import nn

from anima_core.models.dit import AnimaDiT


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor) -> bool:
    return isinstance(tensor, _dtensor())


def shard_dit(dit: AnimaDiT, processes, *, compute_dtype: torch.dtype | None) -> None:
    """Shard ``dit`` in place over the run's processes; ``compute_dtype``: the dtype weights are gathered in for
    forward and backward (bf16 under bf16 mixed precision; gradients are reduced in float32), None for their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(processes.device.type, (processes.num_processes,))
    policy = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype is not None
              else MixedPrecisionPolicy())
    units = [*dit.blocks, *([dit.llm_adapter] if dit.llm_adapter is not None else [])]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(dit, mesh=mesh, mp_policy=policy)  # the embedders and the final layer


def sum_gradients(params: list[nn.Parameter], num_processes: int) -> None:
    """After backward: the processes' gradient sum from FSDP's average (see the module's docstring)."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(num_processes)


def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the gradients together, whole tensors or shards (then over every process's shards)."""
    if not grads:
        return torch.zeros(())
    if any(is_sharded(g) for g in grads):
        return whole(torch.nn.utils.get_total_norm(grads))
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))


def whole(value):
    """A replicated result (a norm over shards) as a plain tensor; anything else as it is."""
    return value.full_tensor() if is_sharded(value) else value


def empty_forward_backward(dit: AnimaDiT, device: torch.device, autocast) -> None:
    """Forward and backward of the smallest input (one 1-patch latent, one token) with its loss times 0: this
    process takes part in every weight gather and gradient reduction of the step and adds exactly zero."""
    cfg = dit.config
    p, r = cfg.patch_spatial, cfg.patch_temporal
    source_dim = cfg.llm_adapter.source_dim if cfg.llm_adapter is not None else cfg.context_dim
    kwargs = {}
    if cfg.llm_adapter is not None:
        ids = torch.ones(1, 1, dtype=torch.long, device=device)
        kwargs = {"target_input_ids": ids, "target_attention_mask": ids, "source_attention_mask": ids}
    with autocast():
        out = dit(torch.zeros(1, cfg.in_channels, r, p, p, device=device), torch.full((1,), 0.5, device=device),
                  torch.zeros(1, 1, source_dim, device=device), **kwargs)
    (out.float().sum() * 0).backward()


# ---- whole tensors for saves and states ------------------------------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _bare(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def whole_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole tensors on the CPU, on the main process ({} on the others); every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def whole_optimizer_state(module: nn.Module, optimizer) -> dict:
    """The optimizer's state with whole tensors keyed by parameter name, on the main process ({} on the others)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, _bare(optimizer), options=_options(cpu_offload=True))


def load_whole_states(module: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Put whole-tensor states (every process holds them) into the module and its optimizer, sharded or not."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, model_state, options=_options())
    set_optimizer_state_dict(module, _bare(optimizer), optimizer_state, options=_options())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor; a whole tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole_from_part(like: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shards, laid out as ``like``'s, are every process's ``part`` (a collective)."""
    if not is_sharded(like):
        return part
    dtensor = _dtensor().from_local(part.to(like.device), like.device_mesh, like.placements,
                                    shape=like.shape, stride=like.stride())
    return dtensor.full_tensor()


def part_of_whole(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole ``value``, laid out as ``like``'s (every process holds ``value``)."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()
