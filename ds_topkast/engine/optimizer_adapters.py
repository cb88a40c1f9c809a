"""Read and rewrite one compact parameter's fp32 master, optimizer moments and low-precision copy.

A refresh replaces the entries of every layer's compact vector, so everything DeepSpeed
keeps per entry must be rewritten consistently: the fp32 master, each per-entry
optimizer state (moved with the entries that stay in B, zero for new ones) and the
low-precision parameter the forward pass reads (`safe_set_full_fp32_param` leaves that
copy alone). Where those live depends on DeepSpeed's optimizer wrapper, hence one small
adapter per wrapper. The interface is runtime/optimizer_state.py; this module and
deepspeed_engine.py are where ds_topkast touches DeepSpeed's optimizer internals.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ds_topkast.errors import UnsupportedOptimizerError
from ds_topkast.runtime.optimizer_state import MasterFragment, MasterViews, OptimizerStateAdapter

# Per-entry state tensors of the basic optimizers ds_topkast knows, by class name.
_PER_ENTRY_STATE: dict[str, tuple[str, ...]] = {
    "Adam": ("exp_avg", "exp_avg_sq"),
    "AdamW": ("exp_avg", "exp_avg_sq"),
    "FusedAdam": ("exp_avg", "exp_avg_sq"),
    "DeepSpeedCPUAdam": ("exp_avg", "exp_avg_sq"),
    "SGD": ("momentum_buffer",),
}



# DeepSpeed config "optimizer.type" values that build one of the optimizers above.
_CONFIG_TYPES = ("adam", "adamw", "sgd")


def refuse_unknown_config_optimizer(ds_config: dict) -> None:
    """Refuse an optimizer named in the DeepSpeed config before DeepSpeed builds (and maybe compiles) it."""
    name = ds_config.get("optimizer", {}).get("type")
    if isinstance(name, str) and name.lower() not in _CONFIG_TYPES:
        raise UnsupportedOptimizerError(
            f"ds_topkast does not know which state of optimizer {name} is per weight (the DeepSpeed config's "
            "optimizer.type), so it cannot move that state at a refresh. Use \"Adam\", \"AdamW\" or \"SGD\".")


def per_entry_state_keys(basic_optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """Names of the optimizer's per-entry state tensors; unknown optimizers are refused."""
    name = type(basic_optimizer).__name__
    if name not in _PER_ENTRY_STATE:
        raise UnsupportedOptimizerError(
            f"ds_topkast does not know which state of optimizer {name} is per weight, so it cannot move that "
            f"state at a refresh. Use one of {sorted(_PER_ENTRY_STATE)}.")
    keys = _PER_ENTRY_STATE[name]
    if any(group.get("amsgrad", False) for group in basic_optimizer.param_groups):
        raise UnsupportedOptimizerError(
            f"{name} with amsgrad=True keeps a running maximum of each weight's second moment (max_exp_avg_sq), "
            "which has no meaning for an entry new to set B and which ds_topkast does not remap at a refresh. "
            "Set amsgrad to false (or leave it out).")
    if name == "SGD" and not any(group.get("momentum", 0) for group in basic_optimizer.param_groups):
        return ()
    return keys


def _flat_source(fragment: Tensor) -> tuple[Tensor, int]:
    """The whole flat fp32 tensor a fragment view lies in, and where the fragment starts in it."""
    storage = fragment.untyped_storage()
    whole = torch.empty(0, dtype=fragment.dtype, device=fragment.device).set_(
        storage, 0, (storage.nbytes() // fragment.element_size(),))
    return whole, fragment.storage_offset()


def zero3_partition(param: nn.Parameter, value: Tensor) -> Tensor:
    """This rank's ZeRO-3 partition of a full flat value, zero-padded to the partition size.

    DeepSpeed's own `safe_set_full_*` for ZeRO-3 slices past the end of the value on the
    last rank when the size does not divide by the world size (0.19.8), so ds_topkast
    slices itself and writes through the local API.
    """
    import deepspeed.comm as dist

    size = param.ds_tensor.numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    piece = value.reshape(-1)[start:start + size]
    return torch.cat([piece, piece.new_zeros(size - piece.numel())])


def _zero3_master_without_host_sync(param: nn.Parameter) -> Tensor | None:
    """ZeRO-3's full fp32 master of `param`, as `safe_get_full_fp32_param` gives it, with no host sync.

    DeepSpeed 0.19.8's getter first blocks the host on its reduce stream
    (`reduce_and_partition_stream.synchronize()`); a device-side wait on that stream orders
    the read the same way, and the all-gather is DeepSpeed's own. This runs every step
    (A's re-selection), so it must not stall the kernel queue. None where the master is not
    on the device (offloaded or swapped), where DeepSpeed's getter is the way.
    """
    from deepspeed.accelerator import get_accelerator

    optimizer = param._z3_optimizer
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    if optimizer.offload_optimizer or optimizer._swappable_optimizer_subgroup(group):
        return None
    if optimizer.reduce_and_partition_stream is not None:
        get_accelerator().current_stream().wait_stream(optimizer.reduce_and_partition_stream)
    partition = optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)
    return optimizer._fp32_state_allgather(param, partition)


def _zero3_master_views(params: list[nn.Parameter]) -> MasterViews | None:
    """ZeRO-3: each parameter's partition of its sub-group's flat fp32 master (the padding past the parameter's
    end left out), read after a device-side wait on DeepSpeed's reduce stream (no host sync)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    fragments, groups = [], set()
    optimizer = params[0]._z3_optimizer
    for param in params:
        group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        if param._z3_optimizer is not optimizer or optimizer.offload_optimizer or \
                optimizer._swappable_optimizer_subgroup(group):
            return None
        position = dist.get_rank(group=param.ds_process_group) * numel
        length = max(0, min(numel, param.ds_numel - position))
        # Offsets into the group tensor's whole storage, as at ZeRO-1/2: fragments of one storage share one source.
        source, base = _flat_source(optimizer.fp32_partitioned_groups_flat[group])
        fragments.append([MasterFragment(source, base + offset, length, position)] if length else [])
        groups.add(group)
    addresses = {group: optimizer.fp32_partitioned_groups_flat[group].data_ptr() for group in groups}

    def valid() -> bool:
        return all(optimizer.fp32_partitioned_groups_flat[group].data_ptr() == address
                   for group, address in addresses.items())

    def prepare() -> None:
        if optimizer.reduce_and_partition_stream is not None:
            get_accelerator().current_stream().wait_stream(optimizer.reduce_and_partition_stream)

    return MasterViews(fragments, partitioned=True, valid=valid, prepare=prepare)


class DeepSpeedManagedState(OptimizerStateAdapter):
    """ZeRO stages 1-3 and BF16_Optimizer: DeepSpeed's safe_{get,set}_full_* API (collectives)."""

    def set_low_precision(self, param, value):
        """Rewrite the copy the forward pass reads: under ZeRO-3 this rank's partition."""
        if not hasattr(param, "ds_tensor"):
            return super().set_low_precision(param, value)
        with torch.no_grad():
            param.ds_tensor.copy_(zero3_partition(param, value))
            # Parameters under stage3_param_persistence_threshold stay gathered between steps:
            # their full copy is what the next forward reads.
            if param.data.numel() == param.ds_numel:
                param.data.copy_(value.reshape(param.ds_shape))

    def get_master(self, param):
        from deepspeed.utils import safe_get_full_fp32_param

        master = _zero3_master_without_host_sync(param) if hasattr(param, "ds_id") else None
        return (safe_get_full_fp32_param(param) if master is None else master).reshape(-1)

    @torch.no_grad()
    def get_masters(self, params):
        """ZeRO-1/2 and BF16_Optimizer: DeepSpeed's `get_full_hp_param` for all of them with one all-reduce.

        Each rank writes the fp32 fragments it owns into one zeroed buffer and the sum
        over ranks is every master in full: what `safe_get_full_fp32_param` does per
        parameter, in one collective instead of one per layer (A's re-selection runs
        every step). ZeRO-3 and mixed process groups take the per-parameter path.
        """
        import deepspeed.comm as dist

        groups = {id(getattr(param, "_dp_group", None)) for param in params}
        if any(hasattr(param, "ds_id") or not hasattr(param, "_hp_mapping") for param in params) or len(groups) != 1:
            return super().get_masters(params)
        sizes = [param.numel() for param in params]
        buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
        for param, slot in zip(params, buffer.split(sizes)):
            if param._hp_mapping is not None:
                address = param._hp_mapping.lp_fragment_address
                slot.narrow(0, address.start, address.numel).copy_(param._hp_mapping.get_hp_fragment())
        dist.all_reduce(buffer, group=params[0]._dp_group)
        return buffer

    def master_views(self, params):
        """ZeRO-1/2 and BF16_Optimizer: each parameter's fragment of this rank's flat fp32 partition
        (`_hp_mapping`); ZeRO-3: its partition of the sub-group's flat fp32 tensor. Offloaded or swapped masters
        are not read in place."""
        if all(hasattr(param, "ds_id") for param in params):
            return _zero3_master_views(params)
        if any(hasattr(param, "ds_id") or not hasattr(param, "_hp_mapping") for param in params):
            return None
        mappings = [param._hp_mapping for param in params]
        if any(mapping is not None and mapping.hp_fragment.device != params[0].device for mapping in mappings):
            return None  # ZeRO-Offload: the masters are in host memory
        fragments = []
        for mapping in mappings:
            if mapping is None:  # this rank holds none of the parameter
                fragments.append([])
                continue
            source, offset = _flat_source(mapping.hp_fragment)
            fragments.append([MasterFragment(source, offset, mapping.lp_fragment_address.numel,
                                             mapping.lp_fragment_address.start)])
        addresses = [None if m is None else m.hp_fragment.data_ptr() for m in mappings]

        def valid() -> bool:
            return [None if p._hp_mapping is None else p._hp_mapping.hp_fragment.data_ptr()
                    for p in params] == addresses

        return MasterViews(fragments, partitioned=True, valid=valid)

    def set_master(self, param, value):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
        if hasattr(param, "ds_id"):
            safe_set_local_fp32_param(param, zero3_partition(param, value.float()))
        else:
            safe_set_full_fp32_param(param, value.float())

    def get_state(self, param, key):
        from deepspeed.utils import safe_get_full_optimizer_state
        return safe_get_full_optimizer_state(param, key).reshape(-1)

    def set_state(self, param, key, value):
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state
        if hasattr(param, "ds_id"):
            safe_set_local_optimizer_state(param, zero3_partition(param, value.float()), key)
        else:
            safe_set_full_optimizer_state(param, value.float(), key)


class PlainOptimizerState(OptimizerStateAdapter):
    """No DeepSpeed wrapper (ZeRO stage 0, fp32): the parameter is its own master."""

    def get_master(self, param):
        return param.detach().float().reshape(-1).clone()

    def master_views(self, params):
        """The fp32 parameters themselves, replicated on every rank (DDP and ZeRO stage 0 keep them whole)."""
        if any(param.dtype != torch.float32 or not param.is_contiguous() for param in params):
            return None
        fragments = [[MasterFragment(*_flat_source(param.detach()), param.numel(), 0)] for param in params]
        addresses = [param.data_ptr() for param in params]
        return MasterViews(fragments, partitioned=False,
                           valid=lambda: [param.data_ptr() for param in params] == addresses)

    def set_master(self, param, value):
        self.set_low_precision(param, value)

    def get_state(self, param, key):
        return self.basic_optimizer.state[param][key].reshape(-1)

    def set_state(self, param, key, value):
        state = self.basic_optimizer.state[param][key]
        state.copy_(value.reshape(state.shape))


def _model_params_per_group(optimizer) -> list[list[nn.Parameter]]:
    """The model's parameters in each of the basic optimizer's param groups, for a DeepSpeed wrapper.

    ZeRO-1/2 and BF16_Optimizer keep one list per group; ZeRO-3 splits groups into
    sub-groups (`sub_group_size`) and maps each back with `sub_group_to_group_id`.
    """
    if hasattr(optimizer, "sub_group_to_group_id"):
        groups: list[list[nn.Parameter]] = [[] for _ in optimizer.optimizer.param_groups]
        for sub_group, params in enumerate(optimizer.fp16_groups):
            groups[optimizer.sub_group_to_group_id[sub_group]].extend(params)
        return groups
    return optimizer.bit16_groups if hasattr(optimizer, "bit16_groups") else optimizer.bf16_groups


def adapter_for(engine) -> OptimizerStateAdapter:
    """The adapter for a DeepSpeed engine's optimizer; unsupported wrappers are refused."""
    return adapter_for_optimizer(engine.optimizer)


def adapter_for_optimizer(optimizer) -> OptimizerStateAdapter:
    """The adapter for a DeepSpeed optimizer wrapper or a plain torch optimizer (accelerate's wrappers unwrapped)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    managed = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)
    while type(optimizer).__module__.startswith("accelerate."):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer / DeepSpeedOptimizerWrapper
    if isinstance(optimizer, managed):
        return DeepSpeedManagedState(per_entry_state_keys(optimizer.optimizer), optimizer.optimizer,
                                     _model_params_per_group(optimizer))
    if isinstance(optimizer, torch.optim.Optimizer):
        return PlainOptimizerState(per_entry_state_keys(optimizer), optimizer)
    raise UnsupportedOptimizerError(
        f"The optimizer is wrapped in {type(optimizer).__name__}, whose master weights ds_topkast cannot "
        "rewrite at a refresh. Use zero_optimization.stage 1, 2 or 3 (any precision) or stage 0 with fp32.")
