"""The diffusion prior loss of Switch-DiT (paper §4.2, Eq. 7-10), as small pure functions.

The pieces, composed by ``DiT.prior_loss``:
  w_prior = prior_table(T, N, M, k)                  (T, N*M) binary, fixed
  w_gate  = activation_map(gate_probs, k)            (T, N*M) binary, top-k of every block
  C       = matching_cost(w_gate, w_prior)           (N*M, N*M)
  perm    = assign(C)                                column permutation of w_prior
  L_dp    = jsd(p_tot(t_b) / N, w_prior[t_b, perm] / (k*N)).mean()

Semantics follow the public reference implementation where it differs from the
paper's text: the window of ones has a fixed width k*N (Eq. 7 read literally lets it
grow by the step of its start), and its start is round((t / (T-1))**alpha * (N*M - k*N)).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "window_table",
    "prior_table",
    "activation_map",
    "matching_cost",
    "assign",
    "jsd",
    "prior_loss",
    "AsyncAssignment",
    "prior_loss_matched",
]


def window_table(num_timesteps: int, units: int, beta: float, alpha: float = 4.0) -> torch.Tensor:
    """Task-wise channel mask of DTR: (T, units) float32 of 0/1.

    Row t holds ``int(units * beta)`` ones starting at
    ``round((t / (T - 1)) ** alpha * (units - int(units * beta)))`` (round half to even,
    as numpy does in the reference implementation).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    return _window(num_timesteps, units, int(units * beta), alpha)


def _window(num_timesteps: int, units: int, width: int, alpha: float) -> torch.Tensor:
    last = units - width
    start = np.round(np.linspace(0.0, 1.0, num_timesteps) ** alpha * last).astype(np.int64)
    # Built on the CPU whatever the default device is (tables are small and fixed).
    table = torch.zeros(num_timesteps, units, dtype=torch.float32, device="cpu")
    cols = torch.arange(units, device="cpu")
    start_t = torch.from_numpy(start)[:, None]
    table[(cols >= start_t) & (cols < start_t + width)] = 1.0
    return table


def prior_table(num_timesteps: int, depth: int, num_experts: int, top_k: int, alpha: float = 4.0) -> torch.Tensor:
    """w_prior of Eq. 7: (T, depth * num_experts) float32 0/1 with k*N ones per row."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if depth < 1 or num_timesteps < 1:
        raise ValueError(f"depth and num_timesteps must be >= 1, got {depth} and {num_timesteps}")
    # Width k*N exactly (the reference's int(N*M * k/M) equals it for every N < 40, M <= 8).
    return _window(num_timesteps, depth * num_experts, depth * top_k, alpha)


def topk_indices(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of the top-k entries of the last dim, ties to the lower index: (..., k) int64."""
    if not 1 <= top_k <= probs.shape[-1]:
        raise ValueError(f"top_k must be in [1, {probs.shape[-1]}], got {top_k}")
    # A stable descending sort keeps equal values in index order (torch.topk does not promise it).
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k]


def activation_map(gate_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """w_gate: (T, N, M) gate probabilities of every block -> (T, N*M) top-k indicators, float32."""
    if gate_probs.dim() != 3:
        raise ValueError(f"gate_probs must be (T, N, M), got shape {tuple(gate_probs.shape)}")
    idx = topk_indices(gate_probs.detach(), top_k)
    w = torch.zeros(gate_probs.shape, dtype=torch.float32, device=gate_probs.device)
    w.scatter_(-1, idx, 1.0)
    return w.flatten(1)


def matching_cost(w_gate: torch.Tensor, w_prior: torch.Tensor) -> torch.Tensor:
    """C[i, j] = sum_t |w_gate[t, i] - w_prior[t, j]|: (U, U) for (T, U) binary maps.

    For 0/1 maps |a - b| = a + b - 2ab, so C is two column sums and one GEMM
    (no (T, U, U) intermediate as in the reference implementation).
    """
    if w_gate.shape != w_prior.shape or w_gate.dim() != 2:
        raise ValueError(
            f"w_gate and w_prior must be equal (T, U) maps, got {tuple(w_gate.shape)} and {tuple(w_prior.shape)}"
        )
    a = w_gate.float()
    b = w_prior.float().to(a.device)
    # Counts up to T: exact in float32, not in an autocast bf16 GEMM (multiples of 4 above 512).
    with torch.autocast(a.device.type, enabled=False):
        return a.sum(0)[:, None] + b.sum(0)[None, :] - 2.0 * (a.t() @ b)


def assign(cost: torch.Tensor) -> torch.Tensor:
    """Hungarian assignment on the host: column index matched to each row, (U,) int64 (CPU).

    This copies ``cost`` to the CPU: a host sync on GPU tensors (the fast path avoids it).
    """
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    out = torch.empty(len(rows), dtype=torch.int64)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return out


def jsd(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Jensen-Shannon divergence per row of (B, U) distributions, eps inside the logs: (B,)."""
    mid = (p + q) / 2
    log_mid = torch.log(mid + eps)
    kl_p = (p * (torch.log(p + eps) - log_mid)).sum(-1)
    kl_q = (q * (torch.log(q + eps) - log_mid)).sum(-1)
    return (kl_p + kl_q) / 2


def prior_loss(
    gate_probs: torch.Tensor,
    w_prior: torch.Tensor,
    timesteps: torch.Tensor,
    top_k: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L_dp for a batch (Eq. 10), the reference implementation's way: scalar tensor.

    gate_probs: (T, N, M) softmax probabilities of every block for every timestep
    (differentiable); w_prior: (T, N*M) from ``prior_table``; timesteps: (B,) int64.
    With ``shuffle`` the columns of both maps are permuted at random before matching,
    which only breaks ties between equally good assignments (as the reference does).
    """
    T, depth, num_experts = gate_probs.shape
    units = depth * num_experts
    if w_prior.shape != (T, units):
        raise ValueError(f"w_prior must be (T={T}, N*M={units}), got {tuple(w_prior.shape)}")
    w_gate = activation_map(gate_probs, top_k)
    w_prior = w_prior.to(device=gate_probs.device, dtype=torch.float32)
    if shuffle:
        g = torch.randperm(units, generator=generator).to(gate_probs.device)
        p = torch.randperm(units, generator=generator).to(gate_probs.device)
    else:
        g = p = torch.arange(units, device=gate_probs.device)
    match = assign(matching_cost(w_gate[:, g], w_prior[:, p])).to(gate_probs.device)
    probs = gate_probs.flatten(1)[timesteps][:, g] / depth
    target = w_prior[timesteps][:, p][:, match]
    target = target / target.sum(-1, keepdim=True)
    return jsd(probs, target.to(probs.dtype)).mean()


class AsyncAssignment:
    """The matching of w_gate to w_prior, kept current without stalling the GPU.

    The Hungarian solve needs the host, and solving the current cost on CUDA would wait
    for the whole queued step. So the assignment lags by exactly one call: call n uses
    the permutation solved from call n - 1's cost, whose device->host copy was queued
    (into pinned memory, marked by a CUDA event) one call earlier and has long arrived
    by then; the first call solves its own cost synchronously. The lag is the same on
    every device and every rank and does not depend on timing, so runs are
    reproducible, DDP ranks agree, and ``state_dict`` / ``load_state_dict`` make a
    resumed run continue exactly. The loss equals the synchronous assignment's (no
    shuffle) whenever the activation map did not change over the last call; the paper
    reports that the maps settle within ~500 iterations.
    """

    def __init__(self) -> None:
        self.perm: torch.Tensor | None = None  # (U,) permutation in use, on the cost's device
        self._host_cost: torch.Tensor | None = None  # the last call's cost (pinned on CUDA)
        self._host_perm: torch.Tensor | None = None
        self._event = None  # CUDA: marks the arrival of _host_cost
        self._pending = False  # _host_cost holds a cost that the next call solves
        self._restored: dict | None = None

    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        """cost: (U, U) matching cost -> (U,) int64 column matched to each row, on cost's device."""
        cost = cost.detach()
        cuda = cost.device.type == "cuda"
        if self.perm is None or self.perm.shape[0] != cost.shape[0] or self.perm.device != cost.device:
            self._start(cost)
        elif self._pending:
            if self._event is not None:
                self._event.synchronize()  # recorded a call ago: complete unless the host is a step ahead
            self._host_perm.copy_(assign(self._host_cost))
            self.perm.copy_(self._host_perm, non_blocking=cuda)
        self._host_cost.copy_(cost.float(), non_blocking=cuda)  # solved at the next call
        if self._event is not None:
            self._event.record(torch.cuda.current_stream(cost.device))  # the copy's stream
        self._pending = True
        return self.perm

    def _start(self, cost: torch.Tensor) -> None:
        U, cuda = cost.shape[0], cost.device.type == "cuda"
        restored, self._restored = self._restored, None
        if restored is not None and restored["perm"] is not None and restored["perm"].shape[0] == U:
            # What the uninterrupted run does now: solve the cost its last call left pending.
            pending = restored.get("cost")
            perm = assign(pending) if pending is not None else restored["perm"]
        else:
            perm = assign(cost)  # first call: one synchronous solve
        self.perm = perm.to(cost.device)
        self._host_cost = torch.empty((U, U), dtype=torch.float32, pin_memory=cuda)
        self._host_perm = torch.empty(U, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._pending = False

    def state_dict(self) -> dict:
        """{"perm": (U,) int64 or None, "cost": (U, U) float32 pending cost or None}, on the
        CPU (waits for the pending copy: call it at checkpoints, not every step)."""
        if self.perm is None:
            return dict(self._restored) if self._restored is not None else {"perm": None, "cost": None}
        if self._pending and self._event is not None:
            self._event.synchronize()
        return {"perm": self.perm.cpu(), "cost": self._host_cost.clone() if self._pending else None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``: the next call uses what the saved matcher's next call would."""
        if set(state) != {"perm", "cost"}:
            raise ValueError(f"state must have the keys 'perm' and 'cost', got {sorted(state)}")
        self.__init__()
        self._restored = {k: (v.detach().cpu() if v is not None else None) for k, v in state.items()}


def prior_loss_matched(
    gate_probs: torch.Tensor, w_prior: torch.Tensor, timesteps: torch.Tensor, top_k: int, matcher: AsyncAssignment
) -> torch.Tensor:
    """``prior_loss`` without shuffling, the matching taken from ``matcher`` (no host sync on CUDA
    after the first call). Same value as ``prior_loss(..., shuffle=False)`` once the matcher has
    solved the current activation map."""
    T, depth, num_experts = gate_probs.shape
    if w_prior.shape != (T, depth * num_experts):
        raise ValueError(f"w_prior must be (T={T}, N*M={depth * num_experts}), got {tuple(w_prior.shape)}")
    w_prior = w_prior.to(device=gate_probs.device, dtype=torch.float32)
    match = matcher(matching_cost(activation_map(gate_probs, top_k), w_prior))
    target = w_prior[timesteps][:, match]
    target = target / target.sum(-1, keepdim=True)
    return jsd(gate_probs.flatten(1)[timesteps] / depth, target.to(gate_probs.dtype)).mean()
