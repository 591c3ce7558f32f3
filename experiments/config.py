"""The training program's configuration: one frozen dataclass, its presets, and its flags.

Every field of `Config` is a command-line flag of `experiments/cifar.py` (`--<field>=<value>`),
documented by the field's `help`. Defaults are the LPWD paper's CIFAR setting:
ConvNeXt-T, batch 512, a constant learning rate (1e-4 for Adam, 1e-2 for SGD-momentum),
lambda = 1e-2, 100 epochs. A preset (`--preset=quickstart`) replaces the defaults with a
small configuration; flags given explicitly still win over a preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

OPTIMIZERS = ("adam", "sgdm")
METHODS = (
    "baseline",
    "l2",
    "wd",
    "rwd",
    "pwd",
    "lpwd",
    "lwd",
    "lpwd_reversed",
    "lpwd_shuffled",
    "wd_matched",
    "adadecay",
    "wrs",
    "wrs_ic",
    "adamp",
    "wrs+adamp",
)
# The weight-decay variants of 2023-2025 (the last block of experiments/methods.py).
METHODS += ("cautious", "corrected", "adams", "cpr")
# Fine-tuning: decoupled decay toward the weights the run starts from (decoupled L2-SP).
METHODS += ("decay_to_init",)
PARALLEL = ("jit", "pmap")
# The paper's base learning rates (Table 2), used when --lr is not given.
DEFAULT_LR = {"adam": 1e-4, "sgdm": 1e-2}


class ConfigError(ValueError):
    """The flags, the data or the output directory cannot make a run: one line, exit status 2."""


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run. See `--help` of experiments/cifar.py for the same text."""

    # What to train.
    model: str = _field(
        "convnext_tiny_cifar",
        "Model name from models.list_models() (e.g. convnext_tiny_cifar, "
        "swin_tiny_cifar, convnext_atto_cifar).",
    )
    model_overrides: str = _field(
        "",
        "JSON object of extra keyword arguments for models.create_model, e.g. "
        '\'{"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}\'.',
    )
    drop_path_rate: float = _field(0.0, "Stochastic depth rate of the model (timm's default 0).")
    init_from: str | None = _field(
        None,
        "Start from a timm checkpoint (.safetensors, or a torch file read with "
        "weights_only=True) of any geometry: the patch kernel, Swin's relative position tables "
        "and the classifier are adapted to --model and the dataset's classes, each adaptation "
        "reported in one line (models.init_from_timm). Or from a run of this program: its "
        "--output_dir (the newest checkpoint) or one of its checkpoints/<step> directories "
        "(orbax; the evaluated weights of PWD/LPWD); the classifier is re-initialized when that "
        "run was trained on other classes (--classes or the class count), as the log says.",
    )
    dataset: str = _field(
        "cifar10",
        "cifar10 | cifar100 (tensorflow-datasets) | digits (scikit-learn, offline) | "
        "folder:<path> (class sub-folders with train/ and test/, a directory or a .zip).",
    )
    data_dir: str | None = _field(None, "tensorflow-datasets data_dir (prepared or manual files).")
    classes: str | None = _field(
        None,
        "Train and test on these classes only, relabelled from 0: a range or a list, e.g. 0-4, "
        "5-9, 0,2,4; default all.",
    )
    train_examples: int | None = _field(
        None,
        "Train on a class-balanced subset of this many examples (train_examples / classes per "
        "class, drawn by --subset_seed); default the whole training split.",
    )
    subset_seed: int = _field(
        0,
        "Seed of the --train_examples draw; independent of --seed, so every seed of a cell "
        "trains on the same images.",
    )

    # How to train.
    optimizer: str = _field(
        "adam", "adam (b1=0.9, b2=0.999, eps=1e-8) | sgdm (momentum 0.9).", choices=OPTIMIZERS
    )
    method: str = _field(
        "lpwd",
        "Regularizer: baseline (none) | l2 (coupled, placed first) | wd | rwd | pwd | lpwd "
        "(decoupled, placed last) | LPWD's controls, all with LPWD's depth-ordered rates: lwd "
        "(WD with LPWD's per-layer rates, no pre-decay), lpwd_reversed (LPWD, the decayed "
        "layers take its rates in reverse depth order), lpwd_shuffled (LPWD, its rates in a "
        "fixed random order of the decayed layers, see --lpwd_permutation_seed), wd_matched "
        "(WD at the parameter-weighted mean of LPWD's rates over the decayed leaves; the rate "
        "goes to config.json) | adadecay (placed first) | wrs (weight rescaling of the "
        "scale-invariant kernels only, as detected at the start and listed in layers.txt; "
        "plain WD on every other leaf, the other kernels included) | wrs_ic (wrs per input "
        "channel, WRS(IC); depthwise kernels per channel) | adamp (AdamP, or SGDP with sgdm: "
        "projected updates and decoupled decay) | wrs+adamp (wrs on AdamP's projected update) | "
        "cautious (cautious WD) | corrected (AdamC's lambda * lr^2 / lr_max; equal to wd at a "
        "constant lr) | adams (AdamS, adam only) | cpr (constrained parameter regularization) | "
        "decay_to_init (decoupled decay toward the weights the run starts from, e.g. "
        "--init_from's: decoupled L2-SP).",
        choices=METHODS,
    )
    lr: float | None = _field(None, "Constant learning rate; default 1e-4 (adam) / 1e-2 (sgdm).")
    weight_decay: float = _field(
        1e-2,
        "lambda. Decoupled methods decay by d_t = lambda * lr per step (paper convention); "
        "l2 and adadecay add lambda * theta to the gradient.",
    )
    lpwd_max_scale: float = _field(2.0, "LPWD: the deepest layer's rate is max_scale * lambda.")
    lpwd_permutation_seed: int = _field(
        0,
        "lpwd_shuffled: seed of the fixed random permutation of LPWD's rates over the decayed "
        "layers (independent of --seed, so every seed of a cell gets the same permutation).",
    )
    adadecay_alpha: float = _field(4.0, "AdaDecay: steepness alpha of the sigmoid.")
    wrs_every: int = _field(1, "WRS: rescale kernels after every this many updates.")
    wrs_mode: str = _field(
        "output",
        "WRS: output (per output channel) | input (WRS(IC)); wrs_ic is wrs with input.",
        choices=("output", "input"),
    )
    layer_decay: float | None = _field(
        None,
        "Layer-wise learning-rate decay (BEiT/ConvNeXt fine-tuning, timm's layer_decay): the "
        "optimizer's update of a layer at depth i of n (from the forward pass, "
        "lo.layerwise_lr_decay) is scaled by layer_decay ** (n - i); the regularizer's decay "
        "is not (timm's AdamW also scales it). Default off.",
    )
    cpr_warm_start: int = _field(
        1000, "CPR: steps before each kernel's bound kappa is set to its squared norm."
    )
    epochs: int = _field(100, "Number of epochs.")
    eval_every: int = _field(
        1,
        "Evaluate (and checkpoint) after every this many epochs and after the last; each record "
        "of metrics.jsonl then covers the epochs since the previous one.",
    )
    batch_size: int = _field(512, "Global batch size (split over processes and devices).")
    eval_batch_size: int | None = _field(None, "Global evaluation batch size; default batch_size.")
    steps_per_epoch: int | None = _field(
        None, "Cap on the training steps per epoch (quick runs); default one full pass."
    )
    eval_steps: int | None = _field(
        None,
        "Cap on evaluation batches per epoch (the first ones in stored order, which may "
        "be sorted by class); default the whole test set.",
    )
    seed: int = _field(0, "Seed of the model init, the data order and the drop-path keys.")

    # Where results go.
    output_dir: str = _field("runs/default", "Directory for metrics, checkpoints and summary.")
    resume: bool = _field(False, "Continue from the latest good checkpoint in output_dir.")
    keep_checkpoints: int = _field(3, "How many epoch checkpoints to keep.")
    log_every_steps: int = _field(20, "Write step metrics (loss, R_op) every this many steps.")
    progress: bool = _field(True, "Show a tqdm progress bar (process 0 only).")

    # Diagnostics: reported, not trained on (Zhang et al.'s mechanisms, arXiv:1810.12281).
    jacobian_probes: int = _field(
        0,
        "Each epoch, log the mean squared Frobenius norm of d logits / d image, "
        "E_x ||J_x||_F^2, and its standard error (lo.jacobian_norm: this many random "
        "projections, one vjp each) on --jacobian_examples fixed test images; 0: off. Off by "
        "default: on the quickstart preset, measured on a 2-core CPU beside another training "
        "run (noisy), 8 probes on 64 images take 0.12 s per epoch against 1.2 s for the "
        "epoch itself (4 on 32: 0.034 s), plus about 10 s to compile once.",
    )
    jacobian_examples: int = _field(
        64, "The first this many test images (the same every epoch) of --jacobian_probes."
    )

    # Parallelism.
    parallel: str = _field(
        "jit",
        "jit: one jax.jit step over a device mesh (batch sharded, state replicated); "
        "pmap: jax.pmap with lax.pmean. Both compute the same numbers.",
        choices=PARALLEL,
    )
    coordinator_address: str | None = _field(
        None, "Multi-host: host:port of process 0 for jax.distributed.initialize."
    )
    num_processes: int | None = _field(None, "Multi-host: total number of processes.")
    process_id: int | None = _field(None, "Multi-host: this process's index.")
    num_devices: int | None = _field(
        None, "Use only the first N devices of each process (default all)."
    )
    compilation_cache_dir: str | None = _field(
        "~/.cache/lpwd_optax/jax",
        "JAX persistent compilation cache (later runs skip XLA "
        "compilation, minutes on CPU); 'none' disables it.",
    )

    # Testing aids.
    stop_after_steps: int | None = _field(
        None,
        "Stop abruptly after this many steps of this invocation, without saving "
        "(simulates a preemption; used to test --resume).",
    )

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def overrides(self) -> dict[str, Any]:
        return json.loads(self.model_overrides) if self.model_overrides else {}

    def validate(self) -> Config:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        for name in (
            "epochs",
            "batch_size",
            "keep_checkpoints",
            "log_every_steps",
            "wrs_every",
            "eval_every",
            "jacobian_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.jacobian_probes < 0:
            raise ValueError(f"--jacobian_probes must be >= 0, got {self.jacobian_probes}")
        for name in (
            "steps_per_epoch",
            "eval_steps",
            "eval_batch_size",
            "num_devices",
            "train_examples",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--lr must be > 0, got {self.learning_rate}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if self.classes is not None:
            from lpwd_optax.experiments.data.subset import parse_classes

            parse_classes(self.classes)  # a DataError (a ValueError) names what is wrong
        if self.model_overrides:
            try:
                overrides = json.loads(self.model_overrides)
            except json.JSONDecodeError as e:
                raise ValueError(f"model_overrides is not valid JSON: {e}") from None
            if not isinstance(overrides, dict):
                raise ValueError("model_overrides must be a JSON object")
        return self


# Presets replace the paper defaults; explicit flags still override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The README's offline quick start: scikit-learn's digits, a 4-stage ConvNeXt with one
    # block per stage and small widths, a few minutes on a 2-core CPU.
    "quickstart": dict(
        dataset="digits",
        model="convnext_atto_cifar",
        model_overrides='{"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}',
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.5,
        epochs=15,
        batch_size=128,
        output_dir="runs/quickstart",
    ),
    # The paper's setting (the defaults), named for sweep scripts.
    "paper": {},
}


def _flag_type(hint: Any) -> type:
    """The flag's value type: `int | None` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every flag's default."""


def build_parser(
    description: str | None = None, *, defaults: bool = True
) -> argparse.ArgumentParser:
    """An argparse parser with one `--<field>` flag per `Config` field, plus `--preset`.

    With `defaults=False` every default is suppressed, so parsing yields only explicit flags.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=_HelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS,
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="Start from a named preset instead of the paper defaults (explicit flags still "
        "win): " + "; ".join(f"{k}: {v or 'the paper defaults'}" for k, v in PRESETS.items()),
    )
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        kind = _flag_type(hints[field.name])
        kwargs: dict[str, Any] = dict(help=field.metadata["help"])
        if defaults:
            kwargs["default"] = field.default
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _none_or(kind)
            if "choices" not in field.metadata:
                kwargs["metavar"] = kind.__name__.upper()
        parser.add_argument(f"--{field.name}", **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """Flags -> Config: the paper defaults, then the preset (if any), then explicit flags."""
    args = build_parser(description).parse_args(argv)  # validates and serves --help
    given = vars(build_parser(defaults=False).parse_args(argv))
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update({k: v for k, v in given.items() if k != "preset"})
    return Config(**values).validate()


def replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes).validate()


def to_dict(config: Config) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    out["learning_rate"] = config.learning_rate
    return out
