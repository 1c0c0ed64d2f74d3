"""The documentation never shows code that does not run.

Every ```` ```python ```` block of a page runs, in page order and in one namespace per
page (a page reads as one script), with `pymdownx.snippets` includes expanded; and the
tutorial scripts run with a small configuration and must actually learn.
"""

import inspect
import pathlib
import re
import types
import typing

import jax
import pytest

from .helpers import load_script


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_SNIPPET = re.compile(
    r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>\w+))?"$', flags=re.MULTILINE
)
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.DOTALL | re.MULTILINE)
PAGES = sorted(
    path.relative_to(DOCS).as_posix()
    for path in DOCS.rglob("*.md")
    if _PYTHON_BLOCK.search(path.read_text())
)


def _expand_snippets(block: str) -> str:
    """Replaces each `--8<-- "path:section"` line, as `pymdownx.snippets` does, with
    that section of the file (paths relative to the repository root)."""

    def expand(match: re.Match) -> str:
        text = (ROOT / match["path"]).read_text()
        if match["section"] is None:
            return text
        start = f"# --8<-- [start:{match['section']}]\n"
        end = f"# --8<-- [end:{match['section']}]"
        assert start in text and end in text, f"no section {match[0]}"
        return text.split(start, 1)[1].split(end, 1)[0]

    return _SNIPPET.sub(expand, block)


def test_pages_with_code_are_found():
    # Guards the regexes: if they stopped matching, the tests below would check
    # nothing.
    assert {"index.md", "getting_started.md", "tutorials/digits.md"} <= set(PAGES)
    digits_blocks = _PYTHON_BLOCK.findall((DOCS / "tutorials/digits.md").read_text())
    assert "def train(" in "".join(map(_expand_snippets, digits_blocks))


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page):
    namespace = {"__name__": f"docs_page_{page}"}
    # Pages are user code, run as users run it: with JAX's default dtype promotion
    # (optax.adam, for one, is not clean under the suite's strict promotion).
    with jax.numpy_dtype_promotion("standard"):
        for number, block in enumerate(
            _PYTHON_BLOCK.findall((DOCS / page).read_text())
        ):
            source = _expand_snippets(block)
            code = compile(source, f"{page} (python block {number})", "exec")
            exec(code, namespace)


def _public_names(package: types.ModuleType) -> set[str]:
    """The package's public attributes; of modules, only its own public submodules."""
    names = set()
    for name in dir(package):
        value = getattr(package, name)
        if name.startswith("_"):
            continue
        if isinstance(value, types.ModuleType) and not value.__name__.startswith(
            package.__name__ + "."
        ):
            continue  # an import such as `importlib`, not part of the API
        names.add(name)
    return names


def test_every_public_name_is_in_the_api_reference():
    import eqx_dodge

    api_pages = "\n".join(path.read_text() for path in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: eqx_dodge\.(\w+)$", api_pages, re.MULTILINE))
    assert {"filter_dodge", "random_direction"} <= documented
    missing = _public_names(eqx_dodge) - documented
    assert not missing, f"public names without a `::: eqx_dodge.name` block: {missing}"


def test_digits_tutorial_learns():
    tutorial = load_script("docs/tutorials/digits_classification.py")
    results = tutorial.main(directions=(0, 10), num_steps=300)
    # Ten classes: chance is 0.1. These bounds hold with a wide margin at this size
    # (measured: backprop 0.97, DODGE k = 10 0.92), and fail if DODGE does not
    # learn or the tutorial is broken.
    backprop, dodge = results[0], results[10]
    assert backprop.test_accuracy > 0.85
    assert dodge.test_accuracy > 0.6
    assert dodge.last_loss < 0.6 * dodge.first_loss


_API_ROW = re.compile(
    r"^\| \[`[\w.]+`\]\[eqx_dodge\.(?P<target>[\w.]+)\][^|]*\| `\((?P<args>.*?)\)` \|",
    flags=re.MULTILINE,
)


def _parameter_names(obj) -> set[str]:
    """The names `obj` accepts, with `**options: Unpack[SomeTypedDict]` expanded."""
    names = set()
    for name, parameter in inspect.signature(obj).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            (typed_dict,) = typing.get_args(
                typing.get_type_hints(obj, include_extras=True)[name]
            )
            names |= set(typed_dict.__annotations__)
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(name)
    return names


def test_api_table_lists_every_argument():
    """The "public API at a glance" table lists each name's arguments: an argument
    added to (or renamed in) a signature but not to the table fails here."""
    import eqx_dodge

    rows = _API_ROW.findall((DOCS / "api" / "index.md").read_text())
    assert len(rows) > 20, "the row pattern no longer matches the table"
    for target, args in rows:
        obj = eqx_dodge
        for part in target.split("."):
            obj = getattr(obj, part)
        shown = {arg.split("=")[0].strip() for arg in args.split(",")} - {"*", ""}
        assert shown == _parameter_names(obj), target


def test_site_needs_no_internet():
    """Every script the site loads ships with it (MathJax included, with the fonts it
    fetches relative to itself), so a local build reads correctly offline."""
    config = (ROOT / "mkdocs.yml").read_text()
    scripts = re.findall(r"^extra_javascript:\n((?:  - .*\n|  #.*\n)+)", config, re.M)
    paths = re.findall(r"^  - (\S+)$", scripts[0], re.M)
    assert "javascripts/mathjax/tex-chtml.js" in paths
    for path in paths:
        assert "://" not in path, path
        assert (DOCS / path).is_file(), path
    fonts = DOCS / "javascripts/mathjax/output/chtml/fonts/woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file()


_FENCED_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```$", flags=re.DOTALL | re.MULTILINE)


def test_code_blocks_fit_the_page():
    """No line of a code block (snippets expanded) is longer than the project's 88
    columns. At a 1280 px wide window, Material's content column between the two
    sidebars (about 740 px) holds about 110 characters of its code font (0.85 ×
    0.8 rem), so such a block needs no horizontal scrolling. A static bound, not a
    browser's rendering: no browser is installed where the suite runs."""
    long_lines = [
        f"{path.relative_to(DOCS)}: {line[:40]}…"
        for path in DOCS.rglob("*.md")
        for block in _FENCED_BLOCK.findall(path.read_text())
        for line in _expand_snippets(block).splitlines()
        if len(line) > 88
    ]
    assert not long_lines, long_lines
