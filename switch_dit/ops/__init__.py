"""The ops of switch-dit: each a public function with a plain PyTorch twin and named strategies.

``strategies(op)`` lists an op's strategies, ``backend="<name>"`` selects one, ``backend="auto"``
(or None) chooses, and ``explain(op, *args, **kw)`` says which would run and why
(``switch_dit.ops.dispatch``; docs/design.md §3).
"""

from switch_dit.ops import compiled_reference, composed_linear  # noqa: F401,E402  register their strategies
from switch_dit.ops.dispatch import explain, register, strategies  # noqa: F401  the registry
from switch_dit.ops.expert_mlp import expert_mlp  # noqa: F401,E402  DiffMoE's expert MLPs over chosen tokens
from switch_dit.ops.norm_modulate import (  # noqa: F401  fused block ops
    fused_block,
    gated_residual,
    mask_ln_modulate,
    reference_block,
    residual_ln_modulate,
)
from switch_dit.ops.routed_linear import (  # noqa: F401  routed expert linear
    expert_mask,
    expert_mask_and_apply,
    mixed_linear,
    mixed_linear_reference,
)
