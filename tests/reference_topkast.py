"""An independent Top-KAST, written plainly from the paper's equations: dense θ, boolean masks, fp32.

This is the reference the compact DeepSpeed implementation is checked against. It
shares no code with ds_topkast: top-K is a stable sort, the forward pass substitutes
α = θ ⊙ A into the dense model with torch.func.functional_call, and AdamW is written
out by hand and applied to B only (entries outside B are frozen, moments of entries
entering B start at zero).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call


def topk_by_sort(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries; a stable sort puts the lower index first on ties."""
    order = torch.sort(-scores.reshape(-1), stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def dense_alpha(values: Tensor, indices: Tensor, forward_mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """α from sets given as indices: the values of A scattered at their flat indices, zero elsewhere."""
    weight = values.new_zeros(shape[0] * shape[1])
    weight[indices] = torch.where(forward_mask, values, torch.zeros_like(values))
    return weight.view(shape)


def uniform_hash(indices: Tensor, seed: int) -> Tensor:
    """The documented pseudo-random value in [0, 1) of a flat index (murmur-style integer mixing)."""
    x = ((indices & 0xFFFFFFFF) * 2654435761 + (seed & 0xFFFFFFFF) * 40503 + 12345) & 0xFFFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x ^ (x >> 16)).double() / 2**32).float()


def seed_of(seed: int, update_index: int, layer_index: int) -> int:
    """The documented seed of one layer's draw at one update (update 0: the start)."""
    return seed * 1_000_003 + update_index * 10_007 + layer_index


class ReferenceTopKAST:
    """Dense mask-based Top-KAST over chosen Linear/Conv1D layers of a dense model copy.

    `layers` maps module name -> (k_forward, k_backward, transposed), where transposed
    means the module stores its weight as (in, out) like GPT-2's Conv1D; θ is kept as
    (out, in) so flat indices agree with the compact layer's.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[int, int, bool]], *, lr: float,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, refresh_interval: int, forward_interval: int,
                 exploration_l2: float = 0.0, per_entry_bias_correction: bool = False, random_backward: bool = False,
                 seed: int = 0):
        self.model = model
        self.layers = layers
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.refresh_interval, self.forward_interval = refresh_interval, forward_interval
        self.l2 = exploration_l2
        self.random_backward, self.seed = random_backward, seed  # the paper's random-B\\A ablation
        self.theta: dict[str, Tensor] = {}
        for name, (_, _, transposed) in layers.items():
            w = model.get_submodule(name).weight.detach().float()
            self.theta[name] = (w.t() if transposed else w).contiguous().clone()
        self.others = {n: p.detach().float().clone() for n, p in model.named_parameters()
                       if n.rsplit(".", 1)[0] not in layers or not n.endswith("weight")}
        self.m = {n: torch.zeros_like(t) for n, t in {**self.theta, **self.others}.items()}
        self.v = {n: torch.zeros_like(t) for n, t in {**self.theta, **self.others}.items()}
        self.step_count = 0
        # With per-entry bias correction, Adam's t of an entry of a sparse layer is its age in B.
        self.per_entry = per_entry_bias_correction
        self.joined = {n: torch.zeros_like(t, dtype=torch.long) for n, t in self.theta.items()}
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self._select_all()

    def _select_all(self) -> None:
        for index, (name, (k_a, k_b, _)) in enumerate(self.layers.items()):
            magnitude = self.theta[name].abs()
            self.A[name] = topk_by_sort(magnitude, k_a).view_as(magnitude)
            scores = magnitude
            if self.random_backward:  # A, then B\\A uniformly at random from the rest
                draw = seed_of(self.seed, self.step_count // self.refresh_interval, index)
                scores = torch.where(self.A[name], 2.0, uniform_hash(torch.arange(magnitude.numel()), draw).view_as(
                    magnitude))
            self.B[name] = topk_by_sort(scores, k_b).view_as(magnitude)

    def _reselect_forward(self) -> None:
        for name, (k_a, _, _) in self.layers.items():
            inside = self.B[name].reshape(-1).nonzero().squeeze(1)
            chosen = inside[topk_by_sort(self.theta[name].reshape(-1)[inside].abs(), k_a)]
            mask = torch.zeros(self.theta[name].numel(), dtype=torch.bool)
            mask[chosen] = True
            self.A[name] = mask.view_as(self.theta[name])

    def loss_and_grads(self, batches, loss_fn) -> tuple[float, dict[str, Tensor]]:
        """Mean loss over micro-batches and dL/dα (plus the regulariser's gradient) per tensor."""
        alphas = {n: (self.theta[n] * self.A[n]).requires_grad_() for n in self.layers}
        others = {n: t.clone().requires_grad_() for n, t in self.others.items()}
        total = 0.0
        for batch in batches:
            params = dict(others)
            for name, (_, _, transposed) in self.layers.items():
                params[f"{name}.weight"] = alphas[name].t() if transposed else alphas[name]
            loss = loss_fn(lambda **kw: functional_call(self.model, params, args=(), kwargs=kw), batch)
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        grads = {n: others[n].grad for n in others}
        for name in self.layers:
            theta, A = self.theta[name], self.A[name]
            # d/dθ of λ(Σ_A θ² + Σ_{B\A} θ²/D) once per step, D the layer's own forward density k_A / n.
            density = self.layers[name][0] / theta.numel()
            reg = 2 * self.l2 * theta * torch.where(A, 1.0, 1.0 / density) * self.B[name]
            grads[name] = alphas[name].grad + reg
        return total, grads

    def _adamw(self, name: str, param: Tensor, grad: Tensor, where: Tensor | None) -> None:
        b1, b2 = self.betas
        t = (self.step_count - self.joined[name]).double() if self.per_entry and name in self.layers else self.step_count
        m = b1 * self.m[name] + (1 - b1) * grad
        v = b2 * self.v[name] + (1 - b2) * grad * grad
        decayed = param * (1 - self.lr * self.wd)
        denom = (v.sqrt() / (1 - b2**t) ** 0.5) + self.eps
        updated = decayed - (self.lr / (1 - b1**t)) * m / denom
        if where is None:
            where = torch.ones_like(param, dtype=torch.bool)
        self.m[name] = torch.where(where, m, self.m[name])
        self.v[name] = torch.where(where, v, self.v[name])
        param.copy_(torch.where(where, updated, param))

    def train_step(self, batches, loss_fn) -> float:
        loss, grads = self.loss_and_grads(batches, loss_fn)
        self.step_count += 1
        for name, param in self.others.items():
            self._adamw(name, param, grads[name], None)
        for name in self.layers:
            self._adamw(name, self.theta[name], grads[name], self.trained_set(name))
        self.after_step(grads)
        return loss

    def trained_set(self, name: str) -> Tensor:
        """The entries the optimizer updates: B."""
        return self.B[name]

    def after_step(self, grads: dict[str, Tensor]) -> None:
        """Refresh A and B from θ, or re-select A inside B, on their schedules."""
        if self.step_count % self.refresh_interval == 0:
            old_B = dict(self.B)
            self._select_all()
            for name in self.layers:
                keep = old_B[name] & self.B[name]
                self.joined[name] = torch.where(keep, self.joined[name], self.step_count)
                self.m[name] = self.m[name] * keep
                self.v[name] = self.v[name] * keep
        elif self.step_count % self.forward_interval == 0:
            self._reselect_forward()
