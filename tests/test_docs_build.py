"""The documentation build's own checks (docs/_ext/lpwd_docs.py), without building the site."""

from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("sphinx", reason="the [docs] extra is not installed")

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import lpwd_docs  # noqa: E402

GROUPS = lpwd_docs.read_groups(DOCS / "api")


def test_every_public_name_is_in_exactly_one_group():
    listed = [name for group in GROUPS.values() for name in group["names"]]
    duplicates = sorted({n for n in listed if listed.count(n) > 1})
    assert not duplicates, f"listed in two groups: {duplicates}"
    message = lpwd_docs.coverage_problems(lpwd_docs.public_names(), set(listed), GROUPS)
    assert message is None, message


def test_groups_read_from_the_autosummary_lists():
    decoupled = GROUPS["decoupled.rst"]
    assert decoupled["module"] == "lpwd_optax"
    assert decoupled["names"][:3] == [
        "lpwd_optax.weight_decay",
        "lpwd_optax.real_time_weight_decay",
        "lpwd_optax.pre_weight_decay",
    ]
    assert "lpwd_optax.models.create_model" in GROUPS["models.rst"]["names"]


def test_missing_page_names_the_name_and_where_to_add_it():
    public = [*lpwd_docs.public_names(), "lpwd_optax.new_transform"]
    documented = {name for group in GROUPS.values() for name in group["names"]}
    documented.discard("lpwd_optax.weight_decay")
    message = lpwd_docs.coverage_problems(public, documented, GROUPS)
    lines = message.splitlines()
    assert lines[0] == "2 public name(s) have no API page:"
    assert lines[1:3] == ["  lpwd_optax.weight_decay", "  lpwd_optax.new_transform"]
    for file in ("decoupled.rst", "layerwise.rst", "models.rst"):
        assert f"docs/api/{file}" in message
    assert "autosummary" in message


def test_listed_name_that_is_not_public_is_reported():
    groups = {k: dict(v, names=list(v["names"])) for k, v in GROUPS.items()}
    groups["helpers.rst"]["names"].append("lpwd_optax.not_public")
    documented = {name for group in groups.values() for name in group["names"]}
    message = lpwd_docs.coverage_problems(lpwd_docs.public_names(), documented, groups)
    assert message.splitlines()[-1] == "  lpwd_optax.not_public"


def test_code_plurals_become_valid_rest():
    lines = ["arrays or `jax.ShapeDtypeStruct`s: a tree", "``x`` and `a` b"]
    lpwd_docs._code_plurals(None, "function", "f", None, None, lines)
    assert lines == ["arrays or `jax.ShapeDtypeStruct`\\ s: a tree", "``x`` and `a` b"]


def test_program_help_is_the_installed_programs_help():
    text = lpwd_docs.program_help("lpwd-sweep")
    assert text.startswith("usage: lpwd-sweep")
    assert "--output_dir" in text
    with pytest.raises(RuntimeError, match="lpwd-plots no_such_figure --help"):
        lpwd_docs.program_help("lpwd-plots", "no_such_figure")


def test_subcommands_from_the_usage_line():
    usage = "usage: lpwd-plots [-h] {curves,rop,zero_shot} ...\n\nFigures."
    assert lpwd_docs.subcommands(usage) == ["curves", "rop", "zero_shot"]
    assert lpwd_docs.subcommands("usage: lpwd-sweep [-h] [--output_dir STR]\n") == []


def test_the_studies_links_point_at_the_pages_that_include_them():
    pages = lpwd_docs.included_files(DOCS)
    results = (DOCS.parent / "experiments" / "results").resolve()
    controls = results / "cifar10_cpu_controls"
    assert pages[controls / "README.md"] == "guides/study/cifar10_cpu_controls"
    assert pages[results / "cifar10_cpu" / "results.md"] == "guides/study/results"
    text = "see [the first](../cifar10_cpu/README.md#protocol), [ours](results.md), [x](no.md)"
    got, unknown = lpwd_docs.rewrite_links(text, controls / "README.md", pages)
    # From guides/study/: the first study's page, and this study's results page (not the
    # first study's results.md, which a naive relative link would reach).
    assert got == (
        "see [the first](cifar10_cpu.md#protocol), [ours](cifar10_cpu_controls_results.md), "
        "[x](no.md)"
    )
    assert unknown == ["no.md"]
