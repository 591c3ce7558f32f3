"""The training program, the studies, the figures and the benchmarks (the `[experiments]`
extra)."""

from lpwd_optax._extras import require

require(
    "lpwd_optax.experiments",
    "experiments",
    [
        ("flax", "flax"),
        ("orbax", "orbax-checkpoint"),
        ("tensorflow_datasets", "tensorflow-datasets"),
        ("sklearn", "scikit-learn"),
        ("scipy", "scipy"),
        ("PIL", "pillow"),
        ("matplotlib", "matplotlib"),
        ("tensorboardX", "tensorboardX"),
        ("absl", "absl-py"),
        ("tqdm", "tqdm"),
        ("importlib_resources", "importlib_resources"),
    ],
)
