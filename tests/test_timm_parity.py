"""The Flax ports compute timm's numbers: logits and loss gradients on random timm weights.

Needs torch and timm (the `[timm]` extra, installed in CI). Float32 on both sides, JAX matmuls at
"highest" precision, torch in eval mode, drop path off. Weights are drawn at unit gain with
non-trivial norms, biases, layer scales and relative position biases, so every parameter matters.

Gradients are compared at the 32x32 CIFAR settings for all three models and at 224x224 for
convnext_atto only: the 224x224 tiny models' backward passes are slow on a 2-core CPU, and
their forward pass (compared here) already goes through every layer of the same code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpwd_optax import models

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.timm

SWIN_CIFAR = dict(img_size=32, patch_size=2, window_size=4)

# (our name, timm name, timm kwargs, image size, batch, compare gradients)
CASES = [
    ("convnext_atto", "convnext_atto", {}, 224, 1, True),
    ("convnext_atto_cifar", "convnext_atto", dict(patch_size=2), 32, 2, True),
    ("convnext_tiny", "convnext_tiny", {}, 224, 1, False),
    ("convnext_tiny_cifar", "convnext_tiny", dict(patch_size=2), 32, 2, True),
    ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", {}, 224, 1, False),
    ("swin_tiny_cifar", "swin_tiny_patch4_window7_224", SWIN_CIFAR, 32, 2, True),
]
NUM_CLASSES = 10


def randomize_(model, seed=0):
    """Redraw every timm parameter so that none sits at a trivial init value."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, mean, std):
        return mean + std * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(normal(p.shape, 0.0, 1.0))
            elif p.ndim > 1:  # conv / linear weights at unit gain
                p.copy_(normal(p.shape, 0.0, 1.0 / math.sqrt(p[0].numel())))
            elif name.endswith("gamma"):  # layer scale, 1e-6 at init
                p.copy_(normal(p.shape, 0.0, 0.5))
            elif name.endswith("weight"):  # norm scales
                p.copy_(normal(p.shape, 1.0, 0.2))
            else:
                p.copy_(normal(p.shape, 0.0, 0.2))
    return model


def timm_model(timm_name, kwargs, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, num_classes=NUM_CLASSES, drop_path_rate=0.0, **kwargs)
    return randomize_(model.eval(), seed)


def inputs(size, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)
    return x, labels


def torch_logits_and_grads(model, x, labels):
    model.zero_grad()
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return logits.detach().numpy(), grads


def flax_model(name, state_dict_or_path):
    model = models.create_model(name, num_classes=NUM_CLASSES, drop_path_rate=0.0)
    return models.load_timm_weights(model, state_dict_or_path)


def relative_error(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize(
    "name, timm_name, kwargs, size, batch, check_grads", CASES, ids=[c[0] for c in CASES]
)
def test_matches_timm(name, timm_name, kwargs, size, batch, check_grads, tmp_path):
    reference = timm_model(timm_name, kwargs)
    x, labels = inputs(size, batch)
    if check_grads:
        want_logits, want_grads = torch_logits_and_grads(reference, x, labels)
    else:
        with torch.no_grad():
            want_logits = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

    if name == "convnext_atto_cifar":  # also exercise the file path: torch.load(weights_only)
        path = tmp_path / "weights.pth"
        torch.save(reference.state_dict(), path)
        model = flax_model(name, path)
    else:
        model = flax_model(name, reference.state_dict())
    fm = models.functional_model(model)

    def loss_fn(params, x, labels):
        logits = fm.apply(params, x)
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1)), logits

    with jax.default_matmul_precision("highest"):
        if check_grads:
            grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True))(fm.params, x, labels)
        else:
            logits = jax.jit(fm.apply)(fm.params, x)

    scale = max(1.0, float(np.abs(want_logits).max()))
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-4 * scale)
    if check_grads:
        got_grads = models.to_timm(model, grads)
        assert got_grads.keys() == want_grads.keys()
        errors = {k: relative_error(got_grads[k], want_grads[k]) for k in want_grads}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-4, f"{worst}: relative gradient error {errors[worst]:.2e}"


def test_converted_model_keeps_its_param_tree():
    """Loading timm weights changes values only: same paths, shapes and dtypes as created."""
    model = models.create_model("swin_tiny_cifar", num_classes=NUM_CLASSES)
    before = jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model, nnx.Param))
    reference = timm_model("swin_tiny_patch4_window7_224", SWIN_CIFAR)
    models.load_timm_weights(model, reference.state_dict())
    after = jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(model, nnx.Param))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert jax.tree.leaves(before) == jax.tree.leaves(after)
