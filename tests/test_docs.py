"""docs/api.md is generated from the code (docs/gen_api.py) and must be up to date."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import neuronmerge as nm
from neuronmerge.cli import build_parser
from tests.scripts import load_script

DOCS = Path(__file__).resolve().parents[1] / "docs"


def generator() -> ModuleType:
    return load_script("docs/gen_api.py")


def test_api_page_is_up_to_date() -> None:
    """The library part must match exactly (run ``python docs/gen_api.py`` after changing a public
    docstring or signature). The command-line part is argparse's help, laid out slightly differently
    by each Python version: there every command and every option must appear."""
    gen = generator()
    committed = (DOCS / "api.md").read_text()
    api, _, cli = committed.partition(gen.CLI_HEADING)
    fresh_api, _, _ = gen.render().partition(gen.CLI_HEADING)
    assert api == fresh_api, "docs/api.md is out of date: run python docs/gen_api.py"

    for name in nm.__all__:
        assert f"`{name}`" in api
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for command, sub in commands.choices.items():
        section = cli.split(f"### `neuronmerge {command}`")[1].split("### `neuronmerge ")[0]
        for action in sub._actions:
            for option in action.option_strings:
                assert option in section, (command, option)


def test_readme_links_the_api_page() -> None:
    assert "(docs/api.md)" in (DOCS.parent / "README.md").read_text()
