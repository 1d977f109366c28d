from switch_dit.ops.norm_modulate import (  # noqa: F401  fused block ops (issue 5)
    fused_block,
    gated_residual,
    mask_ln_modulate,
    reference_block,
    residual_ln_modulate,
)
