"""The README's ten-line example and the stacked-layers guide's examples run."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_trains(capsys):
    text = README.read_text()
    block = re.search(r"## Ten lines.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    table = capsys.readouterr().out
    assert "Dense_3" in table
    assert float(namespace["loss"]) < 2.0  # log(10) = 2.30 at the start
    params, weights = namespace["params"], namespace["weights"]
    # The deepest kernel gets the largest decay: evaluated weights differ most from stored.
    ratio = np.asarray(weights["Dense_3"]["kernel"]) / np.asarray(params["Dense_3"]["kernel"])
    np.testing.assert_allclose(ratio, 1.0 / (1.0 - 2e-2 * 1e-3), rtol=1e-5)


GUIDE = README.parent / "docs" / "guides" / "stacked_layers.md"


def _guide_blocks():
    text = GUIDE.read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S), re.findall(
        r"```text\n(.*?)```", text, re.S
    )


def test_stacked_layers_guide_examples_run(capsys):
    blocks, printed = _guide_blocks()
    assert len(blocks) == 4
    linen, equinox, haiku, plain = ({} for _ in range(4))
    exec(compile(blocks[0], str(GUIDE), "exec"), linen)
    assert capsys.readouterr().out.strip() == printed[0].strip()  # the table as shown
    assert linen["rates"]["blocks"]["Dense_0"]["kernel"].shape == (6, 1, 1)
    exec(compile(blocks[1], str(GUIDE), "exec"), equinox)
    rescaled = equinox["rescaled"]
    rows = np.linalg.norm(np.asarray(rescaled.blocks.linear.weight), axis=-1)  # (6, out)
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5)
    depths = equinox["layers"].depths.blocks.linear.weight.ravel().tolist()
    assert depths == [2, 3, 4, 5, 6, 7]
    exec(compile(blocks[2], str(GUIDE), "exec"), haiku)
    mask = haiku["layers"].decay_mask
    assert not mask["batch_norm"]["scale"] and not mask["batch_norm"]["offset"]
    stacked = haiku["layers"].depths["__layer_stack_no_per_layer/linear"]["w"]
    assert stacked.ravel().tolist() == [3, 4, 5, 6] and haiku["layers"].num_layers == 7
    exec(compile(blocks[3], str(GUIDE), "exec"), plain)
    assert capsys.readouterr().out.strip() == "[6 5 4 3 2 1]"  # as the comment says
    layers = plain["layers"]
    assert layers.depths["blocks"]["gain"].ravel().tolist() == [6, 5, 4, 3, 2, 1]
    assert layers.decay_mask == {"blocks": {"gain": False, "w": True}, "head": {"w": True}}
    assert plain["rates"]["blocks"]["w"].shape == (6, 1, 1) and layers.num_layers == 7


def test_readme_shows_the_guides_table():
    _, printed = _guide_blocks()
    shown = re.findall(r"```text\n(.*?)```", README.read_text(), re.S)
    assert printed[0] in shown
