"""lpwd_optax: weight-decay regularizers for JAX as composable Optax transforms.

Place coupled regularizers (`l2_regularization`, `adaptive_weight_decay`,
`randomized_weight_decay`) FIRST in an `optax.chain`, before the optimizer; place decoupled
ones (`weight_decay`, `real_time_weight_decay`, `pre_weight_decay`, `weight_rescaling`) LAST,
after it, where they see the optimizer's final update. `project_scale_invariant` (AdamP's
projection) wraps the optimizer: it needs both the raw gradient and the final update.

The weight-decay variants of 2023-2025 follow the same rules: `cautious_weight_decay`,
`corrected_weight_decay` (AdamC) and `constrained_parameter_regularization` (CPR) go LAST;
`stable_weight_decay` (AdamS) wraps an Adam-like optimizer, whose second moment it reads.
`rate_from_timescale` turns an averaging timescale into a decay rate.

`layerwise_lr_decay` scales each layer's update by `decay ** (n - depth)` (layer-wise
learning-rate decay for fine-tuning); it goes after the optimizer.
"""

from lpwd_optax._common import default_decay_mask, path_str
from lpwd_optax.adaptive import (
    adaptive_weight_decay,
    decay_coefficients,
    randomized_weight_decay,
)
from lpwd_optax.anchored import decay_to_init
from lpwd_optax.cautious import cautious_weight_decay
from lpwd_optax.constrained import constrained_parameter_regularization, cpr
from lpwd_optax.corrected import adamc, corrected_weight_decay
from lpwd_optax.decay import (
    evaluated_params,
    l2_regularization,
    lpwd_adam,
    pre_decay_params,
    pre_weight_decay,
    real_time_weight_decay,
    weight_decay,
)
from lpwd_optax.diagnostics import (
    jacobian_norm,
    layer_statistics,
    opposing_penalty_rate,
    penalties,
    scale_invariant_mask,
    scale_sensitivity,
)
from lpwd_optax.layerwise import depth_labels, depth_table, layerwise_schedule
from lpwd_optax.lr_decay import layerwise_lr_decay, layerwise_lr_scales
from lpwd_optax.projection import adamp, project_scale_invariant, sgdp
from lpwd_optax.rescaling import rescale_kernel, rescale_params, weight_rescaling
from lpwd_optax.stable import adams, stable_weight_decay
from lpwd_optax.structure import LayerStructure, LeafLayout, layer_structure
from lpwd_optax.timescale import rate_from_timescale

__version__ = "0.1.0"

__all__ = [
    "LayerStructure",
    "LeafLayout",
    "adamc",
    "adamp",
    "adams",
    "adaptive_weight_decay",
    "cautious_weight_decay",
    "constrained_parameter_regularization",
    "corrected_weight_decay",
    "cpr",
    "decay_coefficients",
    "decay_to_init",
    "default_decay_mask",
    "depth_labels",
    "depth_table",
    "evaluated_params",
    "jacobian_norm",
    "l2_regularization",
    "layer_statistics",
    "layer_structure",
    "layerwise_lr_decay",
    "layerwise_lr_scales",
    "layerwise_schedule",
    "lpwd_adam",
    "opposing_penalty_rate",
    "path_str",
    "penalties",
    "pre_decay_params",
    "pre_weight_decay",
    "project_scale_invariant",
    "randomized_weight_decay",
    "rate_from_timescale",
    "real_time_weight_decay",
    "rescale_kernel",
    "rescale_params",
    "scale_invariant_mask",
    "scale_sensitivity",
    "sgdp",
    "stable_weight_decay",
    "weight_decay",
    "weight_rescaling",
]
