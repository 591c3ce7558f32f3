"""Fine-tuning starts: 224-pixel timm checkpoints adapted to other geometries, checked with timm.

Needs torch and timm (the `[timm]` extra). Each case saves a randomized 224-geometry timm model
(10 classes) to a file, builds timm's model of the target geometry from that file through timm's
own loading path, and the Flax model through `models.init_from_timm`; their eval-mode logits
agree. Params that the checkpoint cannot provide (a new classifier, ConvNeXt's stage-0
downsample at patch 2) keep the Flax model's initialization and are copied into timm's model, so
that the comparison covers everything else.

ConvNeXt: timm's own path refuses a patch-4 checkpoint for patch_size=2 (its filter resamples
nothing), so its reference is assembled from timm's pieces: `timm.models.load_state_dict`, the
ConvNeXt `checkpoint_filter_fn`, and `timm.layers.resample_patch_embed` (what timm's Swin filter
calls) on the stem.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from lpwd_optax import models
from tests._cifar_helpers import TINY_OVERRIDES, run_flags

try:
    import timm
    import torch

    from tests.test_timm_parity import randomize_
except ImportError:
    timm = torch = None

# The timm comparisons; the training-program test below needs neither torch nor timm.
with_timm = [
    pytest.mark.timm,
    pytest.mark.skipif(timm is None, reason="needs torch and timm (the [timm] extra)"),
]

SOURCE_CLASSES = 10
SWIN = "swin_tiny_patch4_window7_224"
SWIN_CIFAR = dict(img_size=32, patch_size=2, window_size=4)

# (Flax name, Flax overrides, timm name, timm kwargs, num_classes, checkpoint file suffix)
CASES = [
    ("convnext_tiny_cifar", {}, "convnext_tiny", dict(patch_size=2), 10, ".pth"),
    ("convnext_tiny_cifar", {}, "convnext_tiny", dict(patch_size=2), 100, ".pth"),
    ("swin_tiny_cifar", {}, SWIN, SWIN_CIFAR, 10, ".safetensors"),
    (SWIN, dict(img_size=32), SWIN, dict(img_size=32), 100, ".safetensors"),
]
IDS = ["convnext_tiny_cifar", "convnext_tiny_cifar-100", "swin_tiny_cifar", "swin_img32_patch4-100"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """timm name, suffix -> a file holding a randomized 224-geometry model's state dict."""
    files = {}

    def get(timm_name, suffix):
        if (timm_name, suffix) not in files:
            torch.manual_seed(0)
            source = timm.create_model(timm_name, num_classes=SOURCE_CLASSES)
            state_dict = randomize_(source).state_dict()
            path = tmp_path_factory.mktemp("checkpoints") / f"{timm_name}{suffix}"
            if suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
            else:
                torch.save(state_dict, path)
            files[timm_name, suffix] = path
        return files[timm_name, suffix]

    return get


def timm_reference(timm_name, kwargs, num_classes, path, flax_state_dict, kept):
    """timm's model of the target geometry, loaded from `path` as timm loads pretrained weights."""
    build = dict(num_classes=num_classes, drop_path_rate=0.0, **kwargs)
    kept_values = {k: torch.from_numpy(np.array(flax_state_dict[k])) for k in kept}
    if timm_name.startswith("swin"):
        overlay = dict(file=str(path), num_classes=SOURCE_CLASSES)
        model = timm.create_model(
            timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **build
        )
        model.load_state_dict(kept_values, strict=False)
        return model.eval()
    from timm.layers import resample_patch_embed
    from timm.models.convnext import checkpoint_filter_fn

    model = timm.create_model(timm_name, **build)
    state_dict = checkpoint_filter_fn(timm.models.load_state_dict(str(path)), model)
    new_size = model.stem[0].weight.shape[-2:]
    state_dict["stem.0.weight"] = resample_patch_embed(
        state_dict["stem.0.weight"], list(new_size), interpolation="bicubic", antialias=True
    )
    if num_classes != SOURCE_CLASSES:  # timm's load_pretrained drops a mismatched classifier
        del state_dict["head.fc.weight"], state_dict["head.fc.bias"]
    model.load_state_dict({**state_dict, **kept_values}, strict=True)
    return model.eval()


@with_timm[0]
@with_timm[1]
@pytest.mark.parametrize("name, overrides, timm_name, kwargs, num_classes, suffix", CASES, ids=IDS)
def test_adapted_checkpoint_matches_timm(
    name, overrides, timm_name, kwargs, num_classes, suffix, checkpoint
):
    path = checkpoint(timm_name, suffix)
    model = models.create_model(name, num_classes=num_classes, drop_path_rate=0.0, **overrides)
    initial = models.to_timm(model)
    adapted = models.adapt_timm_checkpoint(model, path)
    notes = models.init_from_timm(model, path)
    assert notes == list(adapted.notes)
    loaded = models.to_timm(model)
    for key in adapted.kept:  # left at the model's initialization
        np.testing.assert_array_equal(loaded[key], initial[key])
    head_kept = "head.fc.weight" in adapted.kept
    assert head_kept == (num_classes != SOURCE_CLASSES)
    assert any(n.startswith("head.fc: the checkpoint has 10 classes") for n in notes) == head_kept

    reference = timm_reference(timm_name, kwargs, num_classes, path, loaded, adapted.kept)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    fm = models.functional_model(model)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(fm.apply)(fm.params, x))
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@with_timm[0]
@with_timm[1]
def test_swin_notes_name_every_adaptation(checkpoint):
    path = checkpoint(SWIN, ".safetensors")
    model = nnx.eval_shape(lambda: models.create_model("swin_tiny_cifar"))
    notes = models.adapt_timm_checkpoint(model, path).notes
    assert notes[0] == (
        "patch_embed.proj.weight: 4x4 patch kernel resampled to 2x2 "
        "(pseudo-inverse of a bicubic resize)"
    )
    tables = [n for n in notes if "relative_position_bias_table" in n]
    assert len(tables) == 12 and len(notes) == 13
    assert tables[0] == (
        "layers.0.blocks.0.attn.relative_position_bias_table: window 7x7 -> 4x4, "
        "table resized (169 -> 49 offsets)"
    )
    assert tables[-1] == (
        "layers.3.blocks.1.attn.relative_position_bias_table: window 7x7 -> 2x2 (clamped to "
        "the stage's 2x2 tokens), table resized (169 -> 9 offsets)"
    )


@with_timm[0]
@with_timm[1]
def test_timm_itself_cannot_load_convnext_at_patch_2(checkpoint):
    """Why the ConvNeXt reference is assembled (see ConvNeXt.timm_checkpoint_filter)."""
    path = checkpoint("convnext_tiny", ".pth")
    overlay = dict(file=str(path), num_classes=SOURCE_CLASSES)
    with pytest.raises(RuntimeError, match=r"size mismatch for stem\.0\.weight"):
        timm.create_model(
            "convnext_tiny", pretrained=True, pretrained_cfg_overlay=overlay, patch_size=2
        )


def test_training_program_starts_from_the_checkpoint(tmp_path, capsys):
    """--init_from loads (and adapts) the checkpoint into the model before the method is built."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from lpwd_optax.experiments import cifar
    from lpwd_optax.experiments.config import parse_config

    source = models.create_model("convnext_atto", num_classes=1000, seed=7, **TINY_OVERRIDES)
    path = tmp_path / "source.safetensors"
    safetensors_numpy.save_file(models.to_timm(source), str(path))
    flags = run_flags(tmp_path / "run", tmp_path / "cache", "--method=pwd", f"--init_from={path}")
    setup = cifar.build(parse_config(flags))
    template = models.create_model("convnext_atto_cifar", num_classes=10, **TINY_OVERRIDES)
    got, want, initial = (
        models.to_timm(template, setup.model.params),
        models.to_timm(source),
        models.to_timm(template),
    )
    np.testing.assert_array_equal(
        got["stages.0.blocks.0.mlp.fc1.weight"], want["stages.0.blocks.0.mlp.fc1.weight"]
    )
    np.testing.assert_array_equal(got["head.norm.weight"], want["head.norm.weight"])
    np.testing.assert_array_equal(got["head.fc.weight"], initial["head.fc.weight"])  # 10 classes
    assert got["stem.0.weight"].shape == (8, 3, 2, 2)
    out = capsys.readouterr().out.splitlines()
    logged = [line for line in out if line.startswith("--init_from")]
    assert logged == [
        "--init_from: stem.0.weight: 4x4 patch kernel resampled to 2x2 (pseudo-inverse of a "
        "bicubic resize)",
        "--init_from: stages.0.downsample: not in the checkpoint (patch_size=2 downsamples in "
        "stage 0): left at the model's initialization",
        "--init_from: head.fc: the checkpoint has 1000 classes, the model 10: classifier left "
        "at the model's initialization",
    ]
    with pytest.raises(cifar.ConfigError, match="--init_from: no such file or directory"):
        cifar.build(parse_config([*flags[:-1], f"--init_from={tmp_path / 'absent.pth'}"]))
