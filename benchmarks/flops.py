"""The work of each benchmark: FLOPs and fewest bytes, counted analytically.

Model FLOPs are counted from the configuration, matmuls only (elementwise work is a
rounding error next to them): the patch embedding, the timestep MLP, per block the adaLN
linear, qkv, attention scores and values, proj, the MLP and, for Switch-DiT, ONE expert
linear per SMoE layer (docs/design.md §2, identity (a): the k-expert mixture is one D x D
linear with mixed weights; the k GEMMs the reference code runs are its own overhead, not
model work), and the final layer. One multiply-add is 2 FLOPs; ``macs`` halves it, which
is the convention of the DiT and Switch-DiT papers' "GFLOPs" columns (DiT-XL/2: 118.6).

A training step costs 3x the forward (backward = 2x), plus, for Switch-DiT, the gate
table (timestep MLP and every layer's gate on all T timesteps), counted once per step, not per
image: the routing of every sample reads its row, and the prior loss uses the whole table.

The op floors use the *least* work that computes the op (one dense GEMM for the routed
linear, whatever k is; the chosen rows' two GEMMs for the expert MLP) and the fewest bytes:
every input read once, every output written once. Every variant of one op shares that work,
so time / floor compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

FREQ_DIM = 256  # sinusoidal features of the timestep embedder


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    depth: int
    heads: int
    patch: int
    input_size: int = 32
    in_channels: int = 4
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    routing: str = "none"  # "none" | "dtr" | "switch"
    num_experts: int = 3
    top_k: int = 2
    num_timesteps: int = 1000

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """'Switch-DiT-XL/2' -> config, without building the model."""
        from switch_dit import models

        fam_size, patch = name.split("/")
        family, size = fam_size.rsplit("-", 1)
        hidden, depth, heads = models.SIZES[size]
        cfg = dict(hidden=hidden, depth=depth, heads=heads, patch=int(patch), routing=models.FAMILIES[family])
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_model(cls, model) -> "ModelConfig":
        return cls(
            hidden=model.hidden_size,
            depth=model.depth,
            heads=model.num_heads,
            patch=model.patch_size,
            input_size=model.input_size,
            in_channels=model.in_channels,
            learn_sigma=model.learn_sigma,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.hidden_size,
            routing=model.routing,
            num_experts=max(model.num_experts, 1),
            top_k=max(model.top_k, 1),
            num_timesteps=model.num_timesteps,
        )


def model_macs(cfg: ModelConfig) -> dict:
    """Multiply-adds of one image's forward pass, by component."""
    D, L, N = cfg.hidden, cfg.tokens, cfg.depth
    hidden_mlp = int(D * cfg.mlp_ratio)
    per_block = {
        "adaLN": 6 * D * D,
        "qkv": 3 * L * D * D,
        "attention": 2 * L * L * D,  # Q K^T and P V
        "proj": L * D * D,
        "mlp": 2 * L * D * hidden_mlp,
    }
    if cfg.routing == "switch":
        per_block["experts"] = L * D * D  # one mixed-weight GEMM, whatever k is (identity (a))
    out = {
        "patch_embed": L * cfg.patch**2 * cfg.in_channels * D,
        "timestep_mlp": FREQ_DIM * D + D * D,
        **{k: N * v for k, v in per_block.items()},
        "final_adaLN": 2 * D * D,
        "final_linear": L * D * cfg.patch**2 * cfg.out_channels,
    }
    return out


def model_flops(cfg: ModelConfig) -> float:
    """FLOPs of one image's forward pass."""
    return 2.0 * sum(model_macs(cfg).values())


def gate_table_flops(cfg: ModelConfig) -> float:
    """FLOPs of the per-step gate table (prior loss): timestep MLP and every gate on all T steps."""
    if cfg.routing != "switch":
        return 0.0
    T, D = cfg.num_timesteps, cfg.hidden
    return 2.0 * T * (FREQ_DIM * D + D * D + cfg.depth * D * cfg.num_experts)


def train_step_flops(cfg: ModelConfig, batch: int) -> float:
    """Forward + backward (2x forward) of a batch, plus the gate table, likewise x3."""
    return 3.0 * (batch * model_flops(cfg) + gate_table_flops(cfg))


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters (all M experts), for the step's byte floor."""
    D, N = cfg.hidden, cfg.depth
    h = int(D * cfg.mlp_ratio)
    block = (D * 6 * D + 6 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D)
    if cfg.routing == "switch":
        block += (D * cfg.num_experts + cfg.num_experts) + cfg.num_experts * (D * D + D)
    return (
        cfg.patch**2 * cfg.in_channels * D
        + D
        + FREQ_DIM * D
        + D
        + D * D
        + D
        + 1001 * D
        + N * block
        + D * 2 * D
        + 2 * D
        + D * cfg.patch**2 * cfg.out_channels
        + cfg.patch**2 * cfg.out_channels
    )


# --------------------------------------------------------------------------- ops


def _passes(mode: str, fwd: tuple[float, float], bwd: tuple[float, float]) -> dict:
    """(flops, bytes) of a mode from those of the forward and the backward."""
    if mode == "fwd":
        f, b = fwd
    elif mode == "bwd":
        f, b = bwd
    elif mode == "fwd+bwd":
        f, b = fwd[0] + bwd[0], fwd[1] + bwd[1]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {"flops": float(f), "bytes": float(b)}


def routed_linear_work(B: int, L: int, D: int, M: int, k: int, elem: int, mode: str) -> dict:
    """m = 1 + sum_j g_j (x W_j + b_j): one dense GEMM forward, two backward (docs/design.md §2.1).

    Bytes: x in and m out (forward); x, dm in and dx out plus the weights and their
    gradients (backward). Top-k indices and weights are negligible.
    """
    act, w = B * L * D * elem, M * (D * D + D) * elem
    fwd = (2.0 * B * L * D * D, 2 * act + w)
    bwd = (4.0 * B * L * D * D, 3 * act + 2 * w)
    return _passes(mode, fwd, bwd)


def expert_mlp_work(S: int, D: int, H: int, E: int, C: int, elem: int, mode: str) -> dict:
    """DiffMoE's expert MLP: E experts (D -> H -> D) over C chosen tokens each of a pool of S.

    FLOPs: the two GEMMs over the E * C (expert, token) rows, forward 2 * 2 R D H, backward
    twice that (dx and dW of both layers); at capacity 1 (R = S) exactly the dense MLP's. GELU,
    the gate scaling and the combine are elementwise, not counted (as everywhere here).
    Bytes: the pool x in and y out, the weights (forward); dy, x in and dx out, the weights in
    and their gradients out (backward). The (R, H) hidden activations are not counted: the
    fewest bytes keep them on chip (recomputed); the index and gate scores are negligible.
    """
    R = E * C
    act, w = S * D * elem, E * (2 * D * H + H + D) * elem
    fwd = (4.0 * R * D * H, 2 * act + w)
    bwd = (8.0 * R * D * H, 3 * act + 2 * w)
    return _passes(mode, fwd, bwd)


def mask_ln_modulate_work(B: int, L: int, D: int, elem: int, mode: str) -> dict:
    """modulate(LN(x * m)): reads x and m, writes the output; backward reads dout, x, m and
    writes dx, dm (mean and rstd per row, and the (B, D) shift/scale, are negligible)."""
    act = B * L * D * elem
    small = 2 * B * D * elem
    fwd = (8.0 * B * L * D, 3 * act + small)
    bwd = (12.0 * B * L * D, 5 * act + 2 * small)
    return _passes(mode, fwd, bwd)


def gated_residual_work(B: int, L: int, D: int, elem: int, mode: str) -> dict:
    """(z + g*a, modulate(LN(r0 + g*a))): reads z, r0, a; writes two outputs. Backward
    reads the two output gradients, r0 and a; writes dz, dr0, da."""
    act = B * L * D * elem
    small = 3 * B * D * elem
    fwd = (10.0 * B * L * D, 5 * act + small)
    bwd = (16.0 * B * L * D, 7 * act + 2 * small)
    return _passes(mode, fwd, bwd)


def routing_plan_work(N: int, T: int, M: int, B: int, k: int) -> dict:
    """Reads the (N, T, M) fp32 gate table and the timesteps; writes indices, weights,
    counts, offsets, order and position. No FLOPs worth counting."""
    read = N * T * M * 4 + B * 8
    write = N * B * k * (8 + 4) + N * (2 * M + 1) * 8 + 2 * N * B * k * 8
    return {"flops": 0.0, "bytes": float(read + write)}


def model_work(cfg: ModelConfig, batch: int, elem: int, mode: str) -> dict:
    """A forward / backward / fwd+bwd of a model on a batch (the block benchmarks use
    1-block models): FLOPs from the counter, bytes = weights once plus input and output."""
    f = batch * model_flops(cfg)
    weights = param_count(cfg) * elem
    io = batch * cfg.tokens * cfg.hidden * elem * 2
    return _passes(mode, (f, weights + io), (2 * f, 2 * weights + 2 * io))


def step_work(cfg: ModelConfig, batch: int) -> dict:
    """A training step. Bytes: the optimizer and EMA must touch every parameter's fp32
    weight, gradient and two moments (read and write) and the EMA copy: ~40 bytes each."""
    return {"flops": train_step_flops(cfg, batch), "bytes": 40.0 * param_count(cfg)}
