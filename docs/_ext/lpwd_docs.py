"""Sphinx extension of this site: the API coverage check, the "See also" block of each API page
and the programs' `--help` output.

- API groups. Each file `docs/api/<group>.rst` (other than `index.rst`) lists its names under one
  `.. autosummary::` directive, one name a line; that list is the only place a name is added.
- Coverage. After reading, every name in `lpwd_optax.__all__` and `lpwd_optax.models.__all__`
  must be a documented Python object; otherwise the build stops with the names that lack a page
  and the group files to add them to.
- `.. api-related:: FULLNAME` (in the autosummary templates) becomes, once every page is read, a
  "See also" block: the other names of the same group, and each guide that refers to the object.
- Docstrings write plurals of code as "`jax.Array`s"; reST needs an escaped space before the
  "s", which `autodoc-process-docstring` inserts.
- A Flax NNX module's page shows its constructor's arguments, not its metaclass's
  `(*args, **kwargs)`.
- A study's README is included into a page of the site (a MyST `{include}`), and its links
  to other files of the repository that the site includes (`../cifar10_cpu/README.md`,
  `results.md`) are rewritten, as the file is read, to the pages that include them; a link to
  a Markdown file no page includes is a warning.
- `.. program-help:: lpwd-cifar [SUBCOMMAND]` runs the installed console script's `--help` at
  build time (in a subprocess) and inserts its output; a sub-command the program offers without
  its own `program-help` is a warning.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.errors import SphinxError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import stringify_signature

PUBLIC_MODULES = ("lpwd_optax", "lpwd_optax.models")
GUIDES_PREFIX = "guides/"
HELP_COLUMNS = "100"
HELP_TIMEOUT_S = 120

logger = logging.getLogger(__name__)


class ApiCoverageError(SphinxError):
    category = "API coverage error"


# API groups -------------------------------------------------------------------------------


def read_groups(api_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """`{group file name: {"title", "module", "names"}}` from the autosummary lists in api_dir.

    `names` are full names (`lpwd_optax.weight_decay`), in the order of the list.
    """
    groups = {}
    for path in sorted(api_dir.glob("*.rst")):
        if path.name == "index.rst":
            continue
        lines = path.read_text().splitlines()
        title = next((line for line in lines if line.strip()), path.stem).strip()
        module, names, in_list = None, [], False
        for line in lines:
            match = re.match(r"\.\. (?:py:)?currentmodule:: (\S+)", line)
            if match:
                module = match.group(1)
            if line.startswith(".. autosummary::"):
                in_list = True
                continue
            if in_list:
                stripped = line.strip()
                if not stripped or stripped.startswith(":"):
                    continue
                if not line.startswith((" ", "\t")):
                    in_list = False
                    continue
                if module is None:
                    raise ApiCoverageError(f"{path}: an autosummary list before `currentmodule`")
                names.append(f"{module}.{stripped}")
        groups[path.name] = {"title": title, "module": module, "names": names}
    return groups


def public_names() -> list[str]:
    """Every public name: `lpwd_optax.__all__` and `lpwd_optax.models.__all__`, fully qualified."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


def coverage_problems(
    public: list[str], documented: set[str], groups: dict[str, dict[str, Any]]
) -> str | None:
    """The error message when a public name has no page or a page is not public; else None."""
    listed = {name for group in groups.values() for name in group["names"]}
    missing = [name for name in public if name not in documented]
    stale = sorted(listed - set(public))
    if not missing and not stale:
        return None
    lines = []
    if missing:
        lines.append(f"{len(missing)} public name(s) have no API page:")
        lines += [f"  {name}" for name in missing]
        lines.append(
            "Add each as one line (the name without its module) to the `.. autosummary::` list "
            "of its group, one of:"
        )
        lines += [
            f"  docs/api/{file}  ({group['title']}; module {group['module']})"
            for file, group in groups.items()
        ]
    if stale:
        lines.append(
            "Listed in docs/api/*.rst but not in a public `__all__` ("
            + ", ".join(PUBLIC_MODULES)
            + "); remove the line or export the name:"
        )
        lines += [f"  {name}" for name in stale]
    return "\n".join(lines)


def _api_dir(app: Sphinx) -> pathlib.Path:
    return pathlib.Path(app.srcdir) / "api"


def _check_coverage(app: Sphinx, env: Any) -> None:
    groups = read_groups(_api_dir(app))
    # A page counts when its name is in a group's list and the object got documented (a page
    # left over from an earlier build, no longer listed, does not).
    listed = {name for group in groups.values() for name in group["names"]}
    documented = set(env.domaindata["py"]["objects"]) & listed
    message = coverage_problems(public_names(), documented, groups)
    if message:
        # Logged (not raised) so the message is the build's last word rather than inside a
        # crash report; the exit status is 1 with or without -W.
        logger.error("API coverage check failed: %s", message)
        app.statuscode = 1


# "See also" on API pages --------------------------------------------------------------------


class related_placeholder(nodes.General, nodes.Element):
    """Stands where the "See also" block goes until every page has been read."""


class ApiRelated(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        return [related_placeholder(fullname=self.arguments[0])]


def _guide_refs(env: Any) -> dict[str, set[str]]:
    if not hasattr(env, "lpwd_guide_refs"):
        env.lpwd_guide_refs = {}
    return env.lpwd_guide_refs


def _collect_guide_refs(app: Sphinx, doctree: nodes.document) -> None:
    """Records which guides refer to which Python objects (their `{func}` etc. roles)."""
    docname = app.env.docname
    if not docname.startswith(GUIDES_PREFIX):
        return
    refs = _guide_refs(app.env)
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("refdomain") != "py":
            continue
        target = node["reftarget"]
        module = node.get("py:module")
        candidates = {target} | ({f"{module}.{target}"} if module else set())
        candidates |= {f"{m}.{target}" for m in PUBLIC_MODULES}
        for name in candidates:
            refs.setdefault(name, set()).add(docname)


def _purge_doc(app: Sphinx, env: Any, docname: str) -> None:
    for docs in _guide_refs(env).values():
        docs.discard(docname)
    shown = _programs_shown(env)
    for command in [c for c, (doc, _) in shown.items() if doc == docname]:
        del shown[command]


def _merge_info(app: Sphinx, env: Any, docnames: set[str], other: Any) -> None:
    refs = _guide_refs(env)
    for name, docs in _guide_refs(other).items():
        refs.setdefault(name, set()).update(docs)
    _programs_shown(env).update(_programs_shown(other))


def _object_link(app: Sphinx, fromdoc: str, fullname: str) -> nodes.Node:
    entry = app.env.domaindata["py"]["objects"].get(fullname)
    text = nodes.literal(text=fullname.rsplit(".", 1)[-1])
    if entry is None:
        return text
    uri = app.builder.get_relative_uri(fromdoc, entry.docname) + "#" + entry.node_id
    return nodes.reference("", "", text, internal=True, refuri=uri)


def _doc_link(app: Sphinx, fromdoc: str, docname: str) -> nodes.Node:
    title = app.env.titles[docname].astext()
    uri = app.builder.get_relative_uri(fromdoc, docname)
    return nodes.reference("", title, internal=True, refuri=uri)


def _joined(items: list[nodes.Node]) -> list[nodes.Node]:
    out: list[nodes.Node] = []
    for i, item in enumerate(items):
        if i:
            out.append(nodes.Text(", "))
        out.append(item)
    return out


def _fill_related(app: Sphinx, doctree: nodes.document, fromdoc: str) -> None:
    groups = read_groups(_api_dir(app)) if any(doctree.findall(related_placeholder)) else {}
    for placeholder in list(doctree.findall(related_placeholder)):
        fullname = placeholder["fullname"]
        items = []
        for file, group in groups.items():
            if fullname in group["names"]:
                siblings = [n for n in group["names"] if n != fullname]
                para = nodes.paragraph()
                para += _doc_link(app, fromdoc, "api/" + file.removesuffix(".rst"))
                if siblings:
                    para += nodes.Text(": ")
                    para += _joined([_object_link(app, fromdoc, n) for n in siblings])
                items.append(para)
        guides = sorted(_guide_refs(app.env).get(fullname, ()))
        if guides:
            para = nodes.paragraph()
            para += nodes.Text("Guides: ")
            para += _joined([_doc_link(app, fromdoc, doc) for doc in guides])
            items.append(para)
        if items:
            block = addnodes.seealso()
            block += items
            placeholder.replace_self(block)
        else:
            placeholder.parent.remove(placeholder)


# Docstrings --------------------------------------------------------------------------------

_CODE_PLURAL = re.compile(r"(?<!`)(`[^`\s][^`]*`)(s)\b")


def _code_plurals(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]):
    """Rewrites "`jax.Array`s" as "`jax.Array`\\ s", which reST reads as code and "s"."""
    lines[:] = [_CODE_PLURAL.sub(r"\1\\ \2", line) for line in lines]


def _class_signature(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None, ret: Any
) -> tuple[str, Any] | None:
    """A class whose metaclass takes `(*args, **kwargs)` (Flax NNX modules) shows its __init__'s
    arguments instead."""
    if what != "class" or not signature or "*args" not in signature:
        return None
    try:
        init = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
        return None
    params = [p for p in init.parameters.values() if p.name != "self"]
    return stringify_signature(init.replace(parameters=params), show_return_annotation=False), ret


# Programs' --help ---------------------------------------------------------------------------

_HELP_SCRIPT = """
import sys
from importlib.metadata import entry_points
(entry,) = entry_points(group="console_scripts", name=sys.argv[1])
sys.argv = [sys.argv[1], *sys.argv[2:], "--help"]
sys.exit(entry.load()())
"""


def program_help(program: str, *args: str) -> str:
    """`program [args] --help` of an installed console script, run in a subprocess."""
    env = {**os.environ, "COLUMNS": HELP_COLUMNS, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT, program, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HELP_TIMEOUT_S,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(
            f"`{' '.join([program, *args])} --help` exited with {result.returncode}: "
            f"{result.stderr.strip()[-2000:]}"
        )
    return result.stdout.rstrip()


def subcommands(help_text: str) -> list[str]:
    """The sub-commands an argparse usage line offers (`usage: prog [-h] {a,b} ...`), if any."""
    match = re.match(r"usage: \S+(?: \[[^\]]*\])* \{([^}]*)\}", help_text)
    return match.group(1).split(",") if match else []


def _programs_shown(env: Any) -> dict[tuple[str, ...], tuple[str, list[str]]]:
    """`{(program, *args): (docname, its sub-commands)}` for every `program-help` read."""
    if not hasattr(env, "lpwd_programs_shown"):
        env.lpwd_programs_shown = {}
    return env.lpwd_programs_shown


def _check_subcommands(app: Sphinx, env: Any) -> None:
    shown = _programs_shown(env)
    for command, (docname, subs) in sorted(shown.items()):
        for sub in subs:
            if (*command, sub) not in shown:
                logger.warning(
                    "`%s %s` has no section; add ```{program-help} %s %s``` to %s",
                    " ".join(command),
                    sub,
                    " ".join(command),
                    sub,
                    env.doc2path(docname),
                )


class ProgramHelp(SphinxDirective):
    """`.. program-help:: lpwd-plots curves`: the command's `--help` as a literal block."""

    required_arguments = 1
    optional_arguments = 4

    def run(self) -> list[nodes.Node]:
        try:
            text = program_help(*self.arguments)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            raise self.error(str(error)) from None
        shown = _programs_shown(self.env)
        shown[tuple(self.arguments)] = (self.env.docname, subcommands(text))
        block = nodes.literal_block(text, text, language="text")
        command = " ".join([*self.arguments, "--help"])
        return [nodes.paragraph("", "", nodes.literal(text=f"$ {command}")), block]


# Included files' links --------------------------------------------------------------------

INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.MULTILINE)
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s:]+\.md)(#[^)\s]*)?\)")


def included_files(srcdir: pathlib.Path) -> dict[pathlib.Path, str]:
    """`{included file (resolved): docname of the page that includes it}` for the site's
    Markdown pages."""
    pages = {}
    for page in sorted(srcdir.rglob("*.md")):
        if "_build" in page.relative_to(srcdir).parts:
            continue
        docname = page.relative_to(srcdir).with_suffix("").as_posix()
        for target in INCLUDE.findall(page.read_text()):
            pages[(page.parent / target).resolve()] = docname
    return pages


def rewrite_links(text: str, source: pathlib.Path, pages: dict[pathlib.Path, str]):
    """`text` of included file `source` with each relative link to a Markdown file that a page
    includes pointing at that page (as a path from the page that includes `source`), and the
    links to Markdown files no page includes."""
    here = pathlib.Path(pages[source]).parent
    unknown = []

    def replace(match: re.Match) -> str:
        target = (source.parent / match.group(1)).resolve()
        if target not in pages:
            unknown.append(match.group(1))
            return match.group(0)
        page = os.path.relpath(pages[target] + ".md", here)
        return f"]({pathlib.Path(page).as_posix()}{match.group(2) or ''})"

    return MARKDOWN_LINK.sub(replace, text), unknown


def _included_links(
    app: Sphinx, relative_path: pathlib.Path, parent_docname: str, content: list[str]
) -> None:
    srcdir = pathlib.Path(app.srcdir)
    pages = getattr(app, "_lpwd_included", None)
    if pages is None:
        pages = app._lpwd_included = included_files(srcdir)
    source = (srcdir / relative_path).resolve()
    if source not in pages:
        return
    content[0], unknown = rewrite_links(content[0], source, pages)
    for link in unknown:
        logger.warning(f"{relative_path}: the link to {link} is to a file no page includes")


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_node(related_placeholder)
    app.add_directive("api-related", ApiRelated)
    app.add_directive("program-help", ProgramHelp)
    app.connect("autodoc-process-docstring", _code_plurals)
    app.connect("autodoc-process-signature", _class_signature)
    app.connect("doctree-read", _collect_guide_refs)
    app.connect("env-purge-doc", _purge_doc)
    app.connect("env-merge-info", _merge_info)
    app.connect("env-check-consistency", _check_coverage)
    app.connect("env-check-consistency", _check_subcommands)
    app.connect("doctree-resolved", _fill_related)
    app.connect("include-read", _included_links)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
