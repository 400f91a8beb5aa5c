"""One example per command, shown at the end of its ``--help`` (an ``example:`` section).

:data:`EXAMPLES` maps a command's words (``("twin", "fit")``) to the lines of its example, each
a ``twinloop`` command as a user types it (a trailing ``&`` runs it in the background);
:func:`add_examples` puts them into the parsers' epilogs, after what the
command's module wrote there (its exit codes). The examples name shipped files and outputs that
earlier examples write (``runs/adults``, ``log.csv``), so that they run as written from the
repository's root; a test parses every one with the command's parser.
"""

from __future__ import annotations

import argparse

#: The example of each command (its words after ``twinloop``).
EXAMPLES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("run",): ("twinloop run --cohort adults --days 2 --controller mpc --out runs/adults",),
    ("report",): ("twinloop report runs/adults",),
    ("simulate",): ("twinloop simulate --cohort adults --days 1 --seed 1",),
    ("emulate",): (
        "twinloop emulate pump --rtu-pty /tmp/tl-pump --cgm-pty /tmp/tl-cgm --time-scale 0.05",
    ),
    ("hil",): (
        "twinloop emulate pump --rtu-pty /tmp/tl-pump --cgm-pty /tmp/tl-cgm --time-scale 0.05 &",
        "twinloop hil --port /tmp/tl-pump --cgm-port /tmp/tl-cgm --time-scale 0.05 --minutes 240",
    ),
    ("evaluate",): (
        "twinloop evaluate --controller basal-bolus,pid --cohort adults --days 1 --out runs/eval",
    ),
    ("train",): ("twinloop train policies/configs/t1d_ppo.yaml --out runs/train/ppo",),
    ("campaign",): ("twinloop campaign glucose_smoke --out runs/glucose_smoke",),
    ("export",): ("twinloop export fhir runs/adults --out bundle.json",),
    ("export", "fhir"): ("twinloop export fhir runs/adults --out bundle.json",),
    ("population",): ("twinloop population sample --n 1000 --seed 7 --out pop.parquet",),
    ("population", "sample"): ("twinloop population sample --n 1000 --seed 7 --out pop.parquet",),
    ("twin",): (
        "twinloop twin synth --patient adult#006 --days 14 --out log.csv",
        "twinloop twin fit log.csv --out twin.yaml --fit-days 7 --validate-days 7 --posterior",
        "twinloop twin replay twin.yaml log.csv --from-day 7 --controller oref0 --out replay",
    ),
    ("twin", "synth"): ("twinloop twin synth --patient adult#006 --days 14 --out log.csv",),
    ("twin", "fit"): (
        "twinloop twin fit log.csv --out twin.yaml --fit-days 7 --validate-days 7 --posterior",
    ),
    ("twin", "replay"): (
        "twinloop twin replay twin.yaml log.csv --from-day 7 --controller oref0 --out replay",
    ),
    ("twin", "individualize"): (
        "twinloop twin individualize --cohort adults --days 7 --out twins/adults",
    ),
    ("therapies",): ("twinloop therapies",),
    ("pendulum",): ("twinloop pendulum --patient healthy --patient severe --out runs/pendulum",),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help text that keeps the example as written but wraps the other paragraphs.

    A paragraph on one line (a description, the exit codes) is wrapped to the terminal; one
    with line breaks (the example) is kept as written.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if "\n" in paragraph:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
            else:
                paragraphs.append(argparse.HelpFormatter._fill_text(self, paragraph, width, indent))
        return "\n\n".join(paragraphs)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``parser`` by name (none for a leaf command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def add_examples(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> None:
    """Put each command's example (:data:`EXAMPLES`) at the end of its ``--help``."""
    for name, child in subcommands(parser).items():
        path = (*words, name)
        example = EXAMPLES.get(path)
        if example is not None:
            section = "example:\n" + "\n".join(f"  {line}" for line in example)
            child.epilog = f"{child.epilog}\n\n{section}" if child.epilog else section
            child.formatter_class = HelpFormatter
        add_examples(child, path)
