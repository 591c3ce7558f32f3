"""Raises one clear ImportError when flax, which the models need, is not installed."""

from lpwd_optax._extras import require

require("lpwd_optax.models", "models", [("flax", "flax")])
