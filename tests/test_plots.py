"""experiments/plots.py mechanisms: the effective learning rate and Jacobian norm of tiny runs."""

from __future__ import annotations

import matplotlib.image
import pytest

from lpwd_optax.experiments import cifar, plots
from tests import _cifar_helpers as helpers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits runs: WD with the Jacobian norm logged, LPWD without."""
    base = tmp_path_factory.mktemp("runs")
    helpers.enable_compilation_cache(base / "jax_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LPWD_OPTAX_CACHE", str(base / "data_cache"))
        for method, extra in (("wd", ["--jacobian_probes=4"]), ("lpwd", [])):
            flags = helpers.run_flags(
                base / method, base / "jax_cache", f"--method={method}", "--epochs=2", *extra
            )
            assert cifar.main(flags) == 0
    return str(base / "wd"), str(base / "lpwd")


def test_mechanisms_figure_is_written_to_the_first_run(runs, capsys):
    wd, lpwd = runs
    assert plots.main(["mechanisms", wd, lpwd]) == 0
    image = matplotlib.image.imread(f"{wd}/mechanisms.png")
    assert image.shape[0] > 400 and image.shape[1] > 1000
    out = capsys.readouterr().out
    assert f"skipped {lpwd}: no Jacobian norm (run it with --jacobian_probes)" in out
    assert f"skipped {wd}" not in out  # both panels drawn for WD, the left one for LPWD
