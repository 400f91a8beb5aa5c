"""Every command's ``--help`` ends with an example that its parser accepts as written."""

from __future__ import annotations

import argparse
import shlex

import pytest

from twinloop.cli.examples import EXAMPLES, subcommands
from twinloop.cli.main import _parser, main

#: Commands without an example: the former spelling of ``simulate --inputs``.
WITHOUT = {("replay",)}


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found = set()
    for name, child in subcommands(parser).items():
        found |= {(*words, name)} | _commands(child, (*words, name))
    return found


def _example(help_text: str) -> list[str]:
    """The command lines of the help's ``example:`` section."""
    lines = help_text.splitlines()
    start = lines.index("example:")  # ValueError: no example section
    return [line.strip() for line in lines[start + 1 :] if line.startswith("  twinloop ")]


def test_every_command_has_an_example() -> None:
    assert _commands(_parser()) - WITHOUT == set(EXAMPLES)


@pytest.mark.parametrize("words", sorted(EXAMPLES), ids=" ".join)
def test_help_shows_the_example_and_it_parses(
    words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    example = _example(capsys.readouterr().out)
    assert example == list(EXAMPLES[words])
    for line in example:
        argv = shlex.split(line.removesuffix("&"))  # "&": in the background
        assert argv[0] == "twinloop"
        try:
            args = _parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"the example does not parse: {line}\n{capsys.readouterr().err}")
        assert callable(args.handler)
    # the example is of this command (a group's may begin with a sibling, e.g. hil's emulate)
    assert any(shlex.split(line)[1 : 1 + len(words)] == list(words) for line in example)
