"""The README's ten-line example runs and LPWD trains with it."""

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
