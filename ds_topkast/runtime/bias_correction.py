"""Per-entry Adam bias correction for entries new to B: each entry's update as a fresh Adam would make it.

An entry that joins B at a refresh starts with zero moments, but Adam corrects the
moments' bias with the global step t, so its first updates are those of a moment
estimate that has seen t gradients: with betas (0.9, 0.999), (1 - β1)/sqrt(1 - β2) ≈ 3.2
times a fresh optimizer's first step, up to about 6.5 times around its tenth step,
and only after thousands of steps the same. The paper-faithful default keeps that
("new_entries": "zero_moments"). "per_entry_bias_correction" replaces, after every
optimizer step, each entry's Adam update by the one its own age a = t - (step it
joined B) gives:

    θ ← θ + lr·m/(1-β1^t)/(sqrt(v/(1-β2^t)) + eps) - lr·m/(1-β1^a)/(sqrt(v/(1-β2^a)) + eps)

using the moments the step left (exact, eps included; decoupled weight decay is
untouched). The learning rate is the one the step used, recorded after the previous
step (schedulers step with the optimizer). Cost: per step, each layer's master and two
moments are read and the master written (through the optimizer-state adapter, so under
ZeRO a gather of each); an entry's join step is one int32 per entry of B, replicated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ds_topkast.core.layers import TopKASTLinear
from ds_topkast.errors import UnsupportedOptimizerError
from ds_topkast.runtime.optimizer_state import OptimizerStateAdapter


class PerEntryBiasCorrection:
    """The step each entry of B joined it, and the correction of every Adam step by those ages."""

    def __init__(self, layers: dict[str, TopKASTLinear], adapter: OptimizerStateAdapter):
        if set(adapter.state_keys) != {"exp_avg", "exp_avg_sq"}:
            raise UnsupportedOptimizerError(
                f"new_entries 'per_entry_bias_correction' corrects Adam's bias correction, but the optimizer is "
                f"{type(adapter.basic_optimizer).__name__}; use Adam or AdamW, or new_entries 'zero_moments'.")
        if any(group.get("bias_correction", True) is False for group in adapter.basic_optimizer.param_groups):
            raise UnsupportedOptimizerError(
                "new_entries 'per_entry_bias_correction' replaces Adam's bias correction by each entry's own, but the "
                "optimizer runs without bias correction (bias_correction: false); enable it or use 'zero_moments'.")
        self.layers, self.adapter = layers, adapter
        self.joined = {name: torch.zeros(layer.k_backward, dtype=torch.int32, device=layer.backward_bits.device)
                       for name, layer in layers.items()}
        self.learning_rates: dict[str, float] = {}
        self.record_learning_rates()

    def for_optimizer(self, adapter: OptimizerStateAdapter) -> "PerEntryBiasCorrection":
        """The same join steps over another optimizer (a later `trainer.train()` builds a new one)."""
        corrected = PerEntryBiasCorrection(self.layers, adapter)
        corrected.joined = self.joined
        return corrected

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Each entry's join step, per layer, on the host."""
        return {"joined": {name: joined.cpu().clone() for name, joined in self.joined.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Take the join steps `state_dict` gave (the learning rates are recorded again: the resumed scheduler's)."""
        self.joined = {name: state["joined"][name].to(joined.device) for name, joined in self.joined.items()}
        self.record_learning_rates()

    def record_learning_rates(self) -> None:
        """The learning rate of each layer's group, as the next optimizer step will use it."""
        self.learning_rates = {name: float(self.adapter.param_group(layer.values)["lr"])
                               for name, layer in self.layers.items()}

    def remap(self, name: str, kept: Tensor, position: Tensor, step: int) -> None:
        """After a refresh at `step`: kept entries keep their join step, new ones joined now."""
        old = self.joined[name]
        self.joined[name] = torch.where(kept, old[position], torch.full_like(old, step))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Give every entry younger than `step` the update of its own age (a collective under ZeRO)."""
        for name, layer in self.layers.items():
            group = self.adapter.param_group(layer.values)
            beta1, beta2 = group["betas"]
            lr, eps = self.learning_rates[name], group["eps"]
            age = (step - self.joined[name]).double()
            m = self.adapter.get_state(layer.values, "exp_avg").double()
            v = self.adapter.get_state(layer.values, "exp_avg_sq").double()

            def update(steps: Tensor | float) -> Tensor:
                return lr * m / (1 - beta1 ** steps) / ((v / (1 - beta2 ** steps)).sqrt() + eps)

            master = self.adapter.get_master(layer.values).double()
            corrected = (master + update(float(step)) - update(age)).float()
            self.adapter.set_master(layer.values, corrected)
            self.adapter.set_low_precision(layer.values, corrected.to(layer.values.dtype))
        self.record_learning_rates()
