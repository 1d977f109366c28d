from switch_dit.ops.norm_modulate import (  # noqa: F401  fused block ops (issue 5)
    fused_block,
    gated_residual,
    mask_ln_modulate,
    reference_block,
    residual_ln_modulate,
)
from switch_dit.ops.routed_linear import (  # noqa: F401  routed expert linear (issue 4)
    expert_mask,
    expert_mask_and_apply,
    mixed_linear,
    mixed_linear_reference,
)
