"""The method registry: each of the paper's regularizers as (base optimizer, regularizer).

`REGISTRY` maps every `--method` to one small builder, `Context -> Method`, in the manner of
optax's `alias.py`: a method is a few lines that name its regularizer and where it goes
(`decoupled`, `coupled`, `replacing`, `predecayed`). A new method is one `@register("name")`
function here and its name in `config.METHODS`.

A method is applied as two optax stages so the training step sees both the base optimizer's
update `u` and the regularized one `u'`, and can measure the decay's penalty `P = u - u'`
(R_op, paper eq. 10-11). The stages are kept in chain order: `Method.tx` is exactly
`optax.chain(*Method.stages)`, and its state is the tuple of the stages' states.

- decoupled decays (wd, rwd, pwd, lpwd, wrs and the LPWD controls) see the base optimizer's
  final update and go LAST: `chain(base, T)`, with `learning_rate` passed so that
  `d_t = lambda * eta`;
- gradient-side penalties (l2, adadecay) must be normalized by the base optimizer like any
  gradient, so they go FIRST: `chain(T, base)`. Their penalty is transformed by Adam and has no
  separate `P`, so R_op is not defined for them (reported as NaN / null), nor for the baseline.
  For wrs, `P` is the whole change made by the regularizer stage, i.e. the rescaling of the
  kernels (which can grow weights, and so counts as opposing) plus WD on the other leaves.

WRS (wrs, wrs_ic, wrs+adamp) rescales only the kernels that the network makes scale-invariant,
as the WRS paper does for the kernels a normalization follows: the `scale_invariant` mask the
training program detects at the start (`lo.scale_sensitivity` below the tolerance of
`lo.scale_invariant_mask`, the table in layers.txt).
Every other leaf, the remaining kernels included, gets plain WD.

Controls for what in LPWD matters (all use LPWD's depth labels and its rates
`lambda * max_scale * i / n`; `decayed layers` are the layers with a leaf in the default decay
mask, i.e. a kernel):
- lwd: decoupled WD with LPWD's per-layer rates, no pre-decay: `chain(base, weight_decay(rates))`;
- lpwd_reversed: LPWD whose decayed layers take LPWD's rates in reverse depth order (the
  shallowest decayed layer gets the deepest one's rate);
- lpwd_shuffled: LPWD whose decayed layers take LPWD's rates in a fixed random order
  (`numpy.random.default_rng(permutation_seed).permutation`, the same for every run seed);
- wd_matched: WD at one rate, the parameter-count-weighted mean of LPWD's rates over the decayed
  leaves, so the same total decay is spread uniformly.
`Method.details` records the rates these derive (the matched rate, the permutation) for the
run's config.json.

AdamP (adamp; SGDP with `--optimizer=sgdm`) needs the raw gradient as well as the update, so it
replaces the base optimizer: its first stage is the whole optimizer with its decay, the second
the identity, and R_op is not defined. `wrs+adamp` is WRS with AdamP's projected update (no
AdamP decay) as the base: kernels are rescaled, the other leaves get WD, and R_op is WRS's.

PWD and LPWD store the pre-decayed weights `phi_t`; `Method.init_params` applies the first
pre-decay and `Method.eval_params` recovers the paper's weights `theta_t`, which are what is
evaluated and exported. For every other method both are the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import lpwd_optax as lo
from lpwd_optax._common import leaves_with_paths

Params = Any


class Method(NamedTuple):
    name: str
    stages: tuple[optax.GradientTransformation, optax.GradientTransformation]
    # "last": decoupled (R_op defined), "first": gradient-side, "wrap": replaces the base
    # optimizer (AdamP), "none": baseline
    placement: str
    init_params: Callable[[Params], Params]  # theta_0 -> stored params
    eval_params: Callable[[Params, Any], Params]  # (stored params, step) -> evaluated weights
    description: str  # printable summary; LPWD includes its depth table
    predecayed: bool = False  # stores pre-decayed weights phi_t (PWD/LPWD): export theta_t too
    # JSON-able numbers the method derived from the params (rates, permutations), for config.json
    details: dict[str, Any] | None = None

    @property
    def tx(self) -> optax.GradientTransformation:
        return optax.chain(*self.stages)

    @property
    def has_rop(self) -> bool:
        return self.placement == "last"


def base_optimizer(
    name: str, learning_rate: float, *, projected: bool = False, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The paper's base optimizers: Adam (0.9, 0.999, 1e-8) or SGD with momentum 0.9.

    With `projected`, their AdamP forms (AdamP / SGDP, decaying kernels by `weight_decay`).
    """
    if name == "adam":
        if projected:
            return lo.adamp(learning_rate, 0.9, 0.999, 1e-8, weight_decay=weight_decay)
        return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    if name == "sgdm":
        if projected:
            return lo.sgdp(learning_rate, momentum=0.9, weight_decay=weight_decay)
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam' or 'sgdm'")


def _identity(params: Params, step: Any = None) -> Params:
    del step
    return params


def _not(mask: Params) -> Params:
    return jax.tree.map(lambda m: not m, mask)


# Methods that rescale the scale-invariant kernels and so need the `scale_invariant` mask.
RESCALING_METHODS = ("wrs", "wrs_ic", "wrs+adamp")
# LPWD-style methods that need LPWD's depth labels (a layer structure of the model).
LAYERWISE_METHODS = ("lpwd", "lwd", "lpwd_reversed", "lpwd_shuffled", "wd_matched")


def _leaf_list(tree: Params) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def _labels_and_rates(labels: Params, rates: Params) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each leaf's depth labels and its rates, as arrays of the labels' shape (a stacked leaf
    holds one label per slice)."""
    out = []
    for d, r in zip(jax.tree.leaves(labels), jax.tree.leaves(rates)):
        d = np.asarray(d, np.int64)
        out.append((d, np.broadcast_to(np.asarray(r, np.float64), d.shape)))
    return out


def decayed_layers(labels: Params, mask: Params) -> list[int]:
    """The depth labels, in increasing order, of the layers with at least one masked leaf."""
    found: set[int] = set()
    for d, m in zip(jax.tree.leaves(labels), jax.tree.leaves(mask)):
        if m:
            found.update(int(i) for i in np.unique(np.asarray(d)))
    return sorted(found)


def reassign_layer_rates(
    labels: Params, rates: Params, mask: Params, order: Sequence[int]
) -> tuple[Params, dict[int, int]]:
    """LPWD's rates moved between the decayed layers: layer `D[j]` takes layer `D[order[j]]`'s.

    `D` are the decayed layers in depth order (`decayed_layers`). Leaves of the other layers
    keep their rate (the mask leaves them undecayed anyway). A stacked leaf's labels and rates
    are arrays over its slices, and each slice is moved on its own.

    Returns:
      The new rate tree and the map {layer label: label whose rate it took}.
    """
    layers = decayed_layers(labels, mask)
    if sorted(order) != list(range(len(layers))):
        raise ValueError(
            f"order must be a permutation of range({len(layers)}) (one entry per decayed "
            f"layer), got {list(order)}"
        )
    pairs = _labels_and_rates(labels, rates)
    rate_of: dict[int, float] = {}
    for d, r in pairs:
        for i, v in zip(d.ravel().tolist(), r.ravel().tolist()):
            rate_of.setdefault(i, v)
    source = {layer: layers[j] for layer, j in zip(layers, order)}
    moved = lambda i, v: rate_of[source[i]] if i in source else v
    new = []
    for (d, r), old in zip(pairs, jax.tree.leaves(rates)):
        if d.ndim == 0:
            new.append(moved(int(d), old))
        else:
            new.append(np.vectorize(moved, otypes=[np.float64])(d, r))
    return jax.tree.unflatten(jax.tree.structure(labels), new), source


def mass_weighted_rate(params: Params, rates: Params, mask: Params) -> float:
    """The parameter-count-weighted mean rate over the masked leaves:
    `sum_l n_l lambda_l / sum_l n_l`, with `n_l` the number of entries of leaf `l` (of each
    slice, for a stacked leaf with one rate per slice)."""
    total = 0
    weighted = 0.0
    for theta, r, m in zip(jax.tree.leaves(params), jax.tree.leaves(rates), jax.tree.leaves(mask)):
        if m:
            total += int(np.size(theta))
            weighted += float(np.sum(np.broadcast_to(np.asarray(r, np.float64), np.shape(theta))))
    if total == 0:
        raise ValueError("mass_weighted_rate: the mask selects no leaf")
    return weighted / total


class Context(NamedTuple):
    """What every method is built from: the run's flags and the model it regularizes."""

    name: str
    optimizer: str  # adam | sgdm
    learning_rate: float  # eta, constant
    weight_decay: float  # lambda
    params: Params  # theta_0: masks, LPWD's depths and the WRS checks are read off it
    base: optax.GradientTransformation  # the base optimizer (`base_optimizer`)
    layers: lo.LayerStructure | None = None
    apply_fn: Callable[..., Any] | None = None
    example_batch: Any = None
    scale_invariant: Params | None = None
    lpwd_max_scale: float = 2.0
    lpwd_permutation_seed: int = 0
    adadecay_alpha: float = 4.0
    wrs_every: int = 1
    wrs_mode: str = "output"
    cpr_warm_start: int = 1000

    @property
    def description(self) -> str:
        return (
            f"{self.name} ({self.optimizer}, lr={self.learning_rate:g}, "
            f"lambda={self.weight_decay:g})"
        )


Builder = Callable[[Context], Method]
REGISTRY: dict[str, Builder] = {}  # method name -> its builder; the names are config.METHODS


def register(*names: str) -> Callable[[Builder], Builder]:
    """Adds a builder to `REGISTRY` under each of `names`."""

    def add(builder: Builder) -> Builder:
        for name in names:
            REGISTRY[name] = builder
        return builder

    return add


def build_method(
    name: str,
    *,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    params: Params,
    **options: Any,
) -> Method:
    """Builds method `name` (a key of `REGISTRY`, see `config.METHODS`) around the base optimizer.

    Args:
      name: baseline | l2 | wd | rwd | pwd | lpwd | lwd | lpwd_reversed | lpwd_shuffled |
        wd_matched | adadecay | wrs | wrs_ic | adamp | wrs+adamp | cautious | corrected |
        adams | cpr.
      optimizer: adam | sgdm.
      learning_rate: the constant learning rate eta.
      weight_decay: lambda.
      params: the initial params theta_0 (used for masks and LPWD's depth labels).
      **options: the other fields of `Context`:
        layers: LPWD and its controls: the model's `lo.layer_structure`, whose per-slice
          depths (`layers.depths`, the layers in order of first use in the forward pass) and
          default decay mask (`layers.decay_mask`) they use.
        apply_fn, example_batch: without `layers`, LPWD and its controls trace
          `apply_fn(params, example_batch)` to build it.
        scale_invariant: WRS methods only: a tree of bools shaped like `params`, True on the
          kernels the network is scale-invariant to (`lo.scale_invariant_mask`); only those
          are rescaled.
        lpwd_max_scale, lpwd_permutation_seed, adadecay_alpha, wrs_every, wrs_mode,
          cpr_warm_start: method hyperparameters (wrs_ic always uses mode "input").
        layer_decay: None, or layer-wise learning-rate decay of the optimizer's update
          (`with_layer_decay`).

    Returns:
      A `Method`.
    """
    base = base_optimizer(optimizer, learning_rate)
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}")
    layer_decay = options.pop("layer_decay", None)
    context = Context(name, optimizer, learning_rate, weight_decay, params, base, **options)
    method = REGISTRY[name](context)
    return method if layer_decay is None else with_layer_decay(method, context, layer_decay)


def with_layer_decay(method: Method, c: Context, decay: float) -> Method:
    """The method with its optimizer stage's update scaled per layer by `decay ** (n - depth)`
    (`lo.layerwise_lr_decay`, depths from the model's layer structure). The regularizer stage
    is not scaled: a decoupled decay keeps `d_t = lambda * eta` at the base learning rate."""
    layers = c.layers
    if layers is None:
        layers = lo.layer_structure(c.params, c.apply_fn, c.example_batch)
    index = 1 if method.placement == "first" else 0  # the stage that holds the optimizer
    stages = list(method.stages)
    stages[index] = optax.chain(stages[index], lo.layerwise_lr_decay(decay, layers))
    n = int(max(np.max(np.asarray(d)) for d in jax.tree.leaves(layers.depths)))
    stem = decay ** (n - 1)
    note = f"; layer-wise lr decay {decay:g} over {n} layers (the first layer's update x{stem:.3g})"
    first, *rest = method.description.split("\n", 1)
    description = "\n".join([first + note, *rest])
    return method._replace(stages=tuple(stages), description=description)


# --------------------------------------------------------------------------------------------
# Where the regularizer goes: after the base optimizer, before it, or instead of it.


def decoupled(
    c: Context,
    regularizer: optax.GradientTransformation,
    note: str = "",
    details: dict[str, Any] | None = None,
) -> Method:
    """`chain(base, regularizer)`: sees the base optimizer's update; R_op is defined."""
    stages = (c.base, regularizer)
    description = c.description + note
    return Method(c.name, stages, "last", _identity, _identity, description, details=details)


def coupled(c: Context, regularizer: optax.GradientTransformation, note: str = "") -> Method:
    """`chain(regularizer, base)`: a gradient-side penalty the base optimizer normalizes."""
    return Method(
        c.name, (regularizer, c.base), "first", _identity, _identity, c.description + note
    )


def replacing(c: Context, optimizer: optax.GradientTransformation, note: str) -> Method:
    """The whole optimizer with its own decay instead of the base one; R_op is not defined."""
    return Method(
        c.name, (optimizer, optax.identity()), "wrap", _identity, _identity, c.description + note
    )


def predecayed(
    c: Context, rate: Any, mask: Params, note: str = "", details: dict[str, Any] | None = None
) -> Method:
    """PWD's pre-decayed weights `phi_t` at `rate`: stored pre-decayed from the start,
    evaluated (and exported) as the paper's `theta_t`."""
    lr = c.learning_rate
    return Method(
        c.name,
        (c.base, lo.pre_weight_decay(rate, learning_rate=lr, mask=mask)),
        "last",
        lambda p: lo.pre_decay_params(p, rate, learning_rate=lr, mask=mask),
        lambda p, step: lo.evaluated_params(p, rate, step, learning_rate=lr, mask=mask),
        c.description + note,
        predecayed=True,
        details=details or None,
    )


# --------------------------------------------------------------------------------------------
# The paper's methods and its baselines


@register("baseline")
def baseline(c: Context) -> Method:
    """No regularizer: the base optimizer alone."""
    return Method(c.name, (c.base, optax.identity()), "none", _identity, _identity, c.description)


@register("l2")
def l2(c: Context) -> Method:
    """L2 regularization: lambda * theta added to the gradient."""
    return coupled(c, lo.l2_regularization(c.weight_decay))


@register("wd")
def wd(c: Context) -> Method:
    """Decoupled weight decay, d_t = lambda * eta."""
    return decoupled(c, lo.weight_decay(c.weight_decay, learning_rate=c.learning_rate))


@register("rwd")
def rwd(c: Context) -> Method:
    """Real-time weight decay: the decay scaled to the step actually taken."""
    return decoupled(c, lo.real_time_weight_decay(c.weight_decay, learning_rate=c.learning_rate))


@register("pwd")
def pwd(c: Context) -> Method:
    """Pre-decay weight decay at one rate on the library's default decay mask."""
    return predecayed(c, c.weight_decay, None)


@register("lpwd")
def lpwd(c: Context) -> Method:
    """PWD with LPWD's rates, growing with depth."""
    rates = layer_rates(c)
    return predecayed(c, rates.rate, rates.mask, rates.note, rates.details)


@register("adadecay")
def adadecay(c: Context) -> Method:
    """AdaDecay: a per-parameter penalty on the gradient, steepness alpha."""
    regularizer = lo.adaptive_weight_decay(c.weight_decay, alpha=c.adadecay_alpha)
    return coupled(c, regularizer, f", alpha={c.adadecay_alpha:g}")


@register("adamp")
def adamp(c: Context) -> Method:
    """AdamP (SGDP with sgdm): projected updates and their own decoupled decay."""
    full = base_optimizer(c.optimizer, c.learning_rate, projected=True, weight_decay=c.weight_decay)
    name = "AdamP" if c.optimizer == "adam" else "SGDP"
    return replacing(c, full, f": {name}, delta=0.1, wd_ratio=0.1")


# --------------------------------------------------------------------------------------------
# LPWD's controls: its per-layer rates without the pre-decay, moved, or averaged


class LayerRates(NamedTuple):
    labels: Params  # LPWD's depth labels
    mask: Params  # the default decay mask of the traced layer structure
    rate: Params  # each leaf's rate (an array over a stacked leaf's slices)
    mean_rate: float  # parameter-weighted over the decayed leaves
    table: str  # lo.depth_table of the rates
    note: str  # for the method's description
    details: dict[str, Any]  # for config.json


def layer_rates(
    c: Context,
    order: Callable[[int], list[int]] | None = None,
    note: str = "",
    details: dict[str, Any] | None = None,
) -> LayerRates:
    """LPWD's rates `lambda * max_scale * i / n`; with `order` (number of decayed layers ->
    permutation), moved between the decayed layers by `reassign_layer_rates`."""
    layers = c.layers
    if layers is None:
        if c.apply_fn is None or c.example_batch is None:
            raise ValueError(
                f"{c.name} needs layers (lo.layer_structure) or apply_fn and example_batch "
                "to order the layers"
            )
        layers = lo.layer_structure(c.params, c.apply_fn, c.example_batch)
    labels, mask = layers.depths, layers.decay_mask
    rate = lo.layerwise_schedule(labels, c.weight_decay, max_scale=c.lpwd_max_scale)
    note = f", max_scale={c.lpwd_max_scale:g}{note}"
    details = dict(details or {})
    if order is not None:
        rate, source = reassign_layer_rates(
            labels, rate, mask, order(len(decayed_layers(labels, mask)))
        )
        details["rate_taken_from_layer"] = {str(k): v for k, v in source.items()}
        note += "; decayed layers take LPWD's rates of layers " + ", ".join(
            f"{k}<-{v}" for k, v in source.items()
        )
    mean_rate = mass_weighted_rate(c.params, rate, mask)
    details["mass_weighted_rate"] = mean_rate
    details["mass_weighted_rate_over_lambda"] = (
        mean_rate / c.weight_decay if c.weight_decay else None
    )
    table = lo.depth_table(c.params, labels, rate)
    note += f"; parameter-weighted mean rate over the decayed leaves {mean_rate:.6g}\n{table}"
    return LayerRates(labels, mask, rate, mean_rate, table, note, details)


@register("lwd")
def lwd(c: Context) -> Method:
    """WD with LPWD's per-layer rates, no pre-decay."""
    rates = layer_rates(c)
    regularizer = lo.weight_decay(rates.rate, learning_rate=c.learning_rate, mask=rates.mask)
    return decoupled(c, regularizer, rates.note, rates.details)


@register("lpwd_reversed")
def lpwd_reversed(c: Context) -> Method:
    """LPWD whose decayed layers take its rates in reverse depth order."""
    rates = layer_rates(c, lambda n: list(range(n))[::-1])
    return predecayed(c, rates.rate, rates.mask, rates.note, rates.details)


@register("lpwd_shuffled")
def lpwd_shuffled(c: Context) -> Method:
    """LPWD whose decayed layers take its rates in a fixed random order."""
    seed = c.lpwd_permutation_seed
    rates = layer_rates(
        c,
        lambda n: [int(j) for j in np.random.default_rng(seed).permutation(n)],
        f", permutation_seed={seed}",
        {"permutation_seed": seed},
    )
    return predecayed(c, rates.rate, rates.mask, rates.note, rates.details)


@register("wd_matched")
def wd_matched(c: Context) -> Method:
    """WD at one rate: the parameter-weighted mean of LPWD's rates over the decayed leaves."""
    rates = layer_rates(c)
    mean, lam = rates.mean_rate, c.weight_decay
    rates.details["matched_rate"] = mean
    regularizer = lo.weight_decay(mean, learning_rate=c.learning_rate, mask=rates.mask)
    note = (
        f": WD at {mean:.6g}, the parameter-weighted mean of LPWD's rates over the decayed "
        f"leaves ({mean / lam:.4f} lambda)\nLPWD's rates:\n{rates.table}"
        if lam
        else ": WD at 0"
    )
    return decoupled(c, regularizer, note, rates.details)


# --------------------------------------------------------------------------------------------
# Weight rescaling (WRS) of the scale-invariant kernels


@register("wrs", "wrs_ic", "wrs+adamp")
def wrs(c: Context) -> Method:
    """The scale-invariant kernels are rescaled (per input channel for wrs_ic, on AdamP's
    projected update for wrs+adamp); every other leaf gets plain WD."""
    if c.scale_invariant is None:
        raise ValueError(
            f"{c.name} needs the scale_invariant mask (lo.scale_invariant_mask): it rescales "
            "only the kernels the network is scale-invariant to"
        )
    invariant = jax.tree.map(bool, c.scale_invariant)
    if jax.tree.structure(invariant) != jax.tree.structure(c.params):
        raise ValueError(f"{c.name}: scale_invariant must have the structure of params")
    for (path, theta), m in zip(leaves_with_paths(c.params), jax.tree.leaves(invariant)):
        if m and np.ndim(theta) < 2:
            raise ValueError(f"{c.name}: scale_invariant marks '{path}', which is not a kernel")
    if c.name == "wrs+adamp":
        c = c._replace(base=base_optimizer(c.optimizer, c.learning_rate, projected=True))
    mode = "input" if c.name == "wrs_ic" else c.wrs_mode
    rescalings = []
    if mode == "input":
        # Per input channel (WRS(IC)), except depthwise kernels (kh, kw, 1, C): with one input
        # entry per output channel, the input-channel norm is one entry and would set every
        # weight to +-1; their input and output channel are the same channel, rescaled as one.
        depthwise = jax.tree.map(lambda m, t: m and _is_depthwise(t), invariant, c.params)
        regular = jax.tree.map(lambda m, d: m and not d, invariant, depthwise)
        if any(jax.tree.leaves(regular)):
            rescalings.append(lo.weight_rescaling(c.wrs_every, mode="input", mask=regular))
        if any(jax.tree.leaves(depthwise)):
            rescalings.append(lo.weight_rescaling(c.wrs_every, mode="output", mask=depthwise))
    elif any(jax.tree.leaves(invariant)):
        rescalings.append(lo.weight_rescaling(c.wrs_every, mode=mode, mask=invariant))
    regularizer = optax.chain(
        lo.weight_decay(c.weight_decay, learning_rate=c.learning_rate, mask=_not(invariant)),
        *rescalings,
    )
    rescaled = [
        path for (path, _), m in zip(leaves_with_paths(c.params), jax.tree.leaves(invariant)) if m
    ]
    note = (
        f", every={c.wrs_every}, mode={mode}: rescales the {len(rescaled)} scale-invariant "
        "kernels (layers.txt), plain WD on every other leaf\nrescaled: " + ", ".join(rescaled)
    )
    return decoupled(c, regularizer, note, {"rescaled": rescaled, "mode": mode})


def _is_depthwise(kernel: Any) -> bool:
    """A depthwise convolution kernel (kh, kw, 1, C): one input entry per output channel."""
    return np.ndim(kernel) == 4 and np.shape(kernel)[2] == 1


# --------------------------------------------------------------------------------------------
# The weight-decay variants of 2023-2025

VARIANTS = ("cautious", "corrected", "adams", "cpr")


@register("cautious")
def cautious(c: Context) -> Method:
    """Cautious WD: decays only where the update and the weight agree in sign."""
    return decoupled(c, lo.cautious_weight_decay(c.weight_decay, learning_rate=c.learning_rate))


@register("corrected")
def corrected(c: Context) -> Method:
    """AdamC's corrected WD. The program's learning rate is constant, so eta_t^2 / eta_max =
    eta: d_t = lambda * eta, as WD."""
    lr = c.learning_rate
    regularizer = lo.corrected_weight_decay(c.weight_decay, learning_rate=lr, max_learning_rate=lr)
    return decoupled(
        c, regularizer, ", decay lambda * lr^2 / lr_max (= lambda * lr at a constant lr)"
    )


@register("adams")
def adams(c: Context) -> Method:
    """AdamS: reads Adam's second moment, so it replaces the base optimizer."""
    if c.optimizer != "adam":
        raise ValueError(
            f"adams needs --optimizer=adam (AdamS reads Adam's second moment), got {c.optimizer!r}"
        )
    full = lo.adams(c.learning_rate, 0.9, 0.999, 1e-8, weight_decay=c.weight_decay)
    return replacing(c, full, ": AdamS, decay over sqrt(mean v_hat)")


@register("cpr")
def cpr(c: Context) -> Method:
    """Constrained parameter regularization; lambda is not used."""
    regularizer = lo.constrained_parameter_regularization("warm_start", c.cpr_warm_start)
    note = f": CPR, kappa warm start after {c.cpr_warm_start} steps, mu_lr=1 (lambda unused)"
    return decoupled(c, regularizer, note)


# --------------------------------------------------------------------------------------------
# Fine-tuning


@register("decay_to_init")
def decay_to_init(c: Context) -> Method:
    """Decoupled decay toward the starting weights (decoupled L2-SP), d_t = lambda * eta."""
    regularizer = lo.decay_to_init(c.weight_decay, learning_rate=c.learning_rate)
    return decoupled(c, regularizer, ": toward theta_0, the weights the run starts from")
