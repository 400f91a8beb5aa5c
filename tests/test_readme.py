"""The README cannot drift: every code block runs as written, and every command parses.

Each fenced ``sh`` and ``python`` block of ``README.md`` is run the way a reader would paste it:

* ``sh`` blocks run in ``bash`` from a scratch directory that holds links to the repository's
  files (so ``.venv/bin/twinloop``, ``scripts/…``, ``policies/configs/…`` resolve and outputs
  such as ``runs/`` or ``twin.yaml`` land in the scratch directory), ``set -e``, background jobs
  (``… &``) stopped at the end;
* ``python`` blocks of one section run in one interpreter, in order (a reader's session).

HTML comments right before a block (invisible on the rendered page, stated in the README's
*Tests* paragraph) say how the test runs it:

* ``<!-- test: replace OLD => NEW -->`` reduces a size (``--minutes 240 => --minutes 60``);
* ``<!-- test: drop PREFIX -->`` leaves out the block's lines starting with PREFIX (opening a
  browser, the test suite itself);
* ``<!-- test: verdict PREFIX -->`` accepts exit status 1 (a failing verdict, e.g. a campaign
  whose requirement fails) from the block's lines starting with PREFIX, and nothing else;
* ``<!-- test: slow -->`` runs the block only under ``-m slow`` (its commands still parse in
  the default suite).

Every ``twinloop`` command of every block, and every complete ``twinloop …`` command quoted in
the prose, is parsed by the real argument parser in the default suite, so a renamed option or
command fails here even where a block is slow.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Repository entries a scratch directory must not link: outputs the README's commands write.
_OUTPUTS = {"runs", "twin.yaml", "replay", "pop.parquet", "bundle.json"}

_DIRECTIVE = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    """One fenced code block of the README, with the test directives written before it."""

    lang: str
    text: str
    line: int
    section: str
    replace: list[tuple[str, str]] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    verdict: list[str] = field(default_factory=list)
    slow: bool = False

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower())[:30]}"

    def runnable_text(self) -> str:
        """The block as the test runs it: sizes reduced, dropped lines left out."""
        text = self.text
        for old, new in self.replace:
            if old not in text:
                raise AssertionError(f"README line {self.line}: `replace {old}` matches nothing")
            text = text.replace(old, new)
        lines = [
            ln for ln in text.splitlines() if not any(ln.lstrip().startswith(p) for p in self.drop)
        ]
        lines = [
            # a failing verdict (1) is an answer; 2 is bad input. Before a trailing comment.
            re.sub(r"^(.*?)(\s+#.*)?$", r"\1 || test $? -eq 1\2", ln, count=1)
            if any(ln.lstrip().startswith(p) for p in self.verdict)
            else ln
            for ln in lines
        ]
        return "\n".join(lines) + "\n"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The README's fenced blocks with their directives (in order)."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    section = ""
    pending: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("## "):
            section = ln[3:].strip()
        m_dir = _DIRECTIVE.match(ln)
        m_fence = _FENCE.match(ln)
        if m_dir:
            pending.append(m_dir.group(1))
        elif m_fence:
            start = i + 1
            j = start
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            block = Block(m_fence.group(1) or "text", "\n".join(lines[start:j]), start, section)
            for d in pending:
                if d == "slow":
                    block.slow = True
                elif d.startswith("replace ") and " => " in d:
                    old, new = d[len("replace ") :].split(" => ", 1)
                    block.replace.append((old, new))
                elif d.startswith("drop "):
                    block.drop.append(d[len("drop ") :])
                elif d.startswith("verdict "):
                    block.verdict.append(d[len("verdict ") :])
                else:
                    raise AssertionError(f"README line {i + 1}: unknown test directive {d!r}")
            blocks.append(block)
            pending = []
            i = j
        elif ln.strip():
            pending = []
        i += 1
    return blocks


def shell_commands(script: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments and ``&`` dropped,
    ``VAR=value`` lines substituted into the later commands."""
    env: dict[str, str] = {}
    joined = script.replace("\\\n", " ")
    commands = []
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=\S+", words[0]):
            name, value = words[0].split("=", 1)
            env[name] = value
            continue
        words = [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]
        if words[-1] == "&":
            words = words[:-1]
        commands.append(words)
    return commands


def twinloop_argv(words: list[str]) -> list[str] | None:
    """The arguments of a ``twinloop`` command (``.venv/bin/twinloop``, ``sh scripts/run.sh``)."""
    if words[0] in ("twinloop", ".venv/bin/twinloop"):
        return words[1:]
    if words[:2] == ["sh", "scripts/run.sh"]:
        return ["run", *words[2:]]
    return None


_PROSE_COMMAND = re.compile(r"`((?:\.venv/bin/)?twinloop [^`]+)`")


def prose_commands(text: str | None = None) -> list[tuple[int, list[str]]]:
    """Complete ``twinloop …`` commands quoted inline in the README's prose (with line numbers).

    Fragments (an ellipsis, ``[optional]`` or ``A|B`` alternatives, an upper-case placeholder
    other than a file such as ``RUN_DIR``) are templates, not commands, and are left out.
    """
    out = []
    paragraphs: list[tuple[int, str]] = []  # inline code may wrap over a line break
    in_block = False
    for n, ln in enumerate(
        (README.read_text(encoding="utf-8") if text is None else text).splitlines(), 1
    ):
        if ln.startswith("```"):
            in_block = not in_block
            continue
        if in_block or not ln.strip():
            paragraphs.append((n + 1, ""))
            continue
        start, para = paragraphs[-1] if paragraphs else (n, "")
        paragraphs[-1:] = [(start if para else n, f"{para} {ln}" if para else ln)]
    for n, para in paragraphs:
        for m in _PROSE_COMMAND.finditer(para):
            cmd = m.group(1)
            if any(tok in cmd for tok in ("...", "…", "[", "|", "NAME", "PATH", "GROUP")):
                continue
            words = shlex.split(cmd)
            argv = twinloop_argv(words)
            # a mention of a command or an option (`twinloop twin fit`, `twinloop run --model`)
            # is not a command: one has an option and a value at least
            if argv and len(argv) >= 3 and any(w.startswith("--") for w in argv):
                out.append((n, [w for w in argv if w != "&"]))
    return out


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in ("sh", "python")]


def _parse(argv: list[str]) -> None:
    from twinloop.cli.main import _parser

    try:
        _parser().parse_args(argv)
    except SystemExit as exc:  # argparse prints its one-line error to stderr
        raise AssertionError(f"`twinloop {' '.join(argv)}` does not parse") from exc


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    langs = [b.lang for b in RUNNABLE]
    assert langs.count("sh") >= 8 and langs.count("python") >= 3, langs
    assert any(b.text.strip() == "sh scripts/run.sh" for b in RUNNABLE)
    assert any(b.text.strip() == "sh scripts/test.sh" for b in RUNNABLE)


def test_directives_are_read_and_refuse_what_they_do_not_know() -> None:
    text = (
        "## S\n<!-- test: replace 240 => 60 -->\n<!-- test: slow -->\n```sh\nx --minutes 240\n```\n"
    )
    (b,) = readme_blocks(text)
    assert b.slow and b.runnable_text() == "x --minutes 60\n"
    (v,) = readme_blocks("<!-- test: verdict x -->\n```sh\nx a   # note\ny b\n```\n")
    assert v.runnable_text() == "x a || test $? -eq 1   # note\ny b\n"
    with pytest.raises(AssertionError, match="unknown test directive"):
        readme_blocks("<!-- test: fast -->\n```sh\nx\n```\n")
    stale = readme_blocks("<!-- test: replace 999 => 1 -->\n```sh\nx 240\n```\n")[0]
    with pytest.raises(AssertionError, match="matches nothing"):
        stale.runnable_text()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(argv, id=f"L{b.line}:{' '.join(argv)[:50]}")
        for b in RUNNABLE
        if b.lang == "sh"
        for words in shell_commands(b.text)
        if (argv := twinloop_argv(words)) is not None
    ],
)
def test_every_command_of_a_block_parses(argv: list[str]) -> None:
    _parse(argv)


@pytest.mark.parametrize(
    "argv", [pytest.param(argv, id=f"L{n}:{' '.join(argv)[:50]}") for n, argv in prose_commands()]
)
def test_every_command_quoted_in_the_prose_parses(argv: list[str]) -> None:
    _parse(argv)


def test_a_renamed_option_fails_the_parse_check() -> None:
    with pytest.raises(AssertionError, match="does not parse"):
        _parse(["run", "--cohorts", "adults"])


def _scratch(tmp_path: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name not in _OUTPUTS and not entry.name.startswith(".git"):
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def _run_block(block: Block, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if block.lang == "python":
        code = "".join(
            b.runnable_text() for b in RUNNABLE if b.lang == "python" and b.section == block.section
        )
        # blocks of one section run as one session; the test of the section's last block runs it
        argv = [sys.executable, "-c", code]
    else:
        stop_jobs = "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT\n"
        script = "set -e\n" + stop_jobs + block.runnable_text()
        argv = ["bash", "-c", script]
    # a session of its own, as a terminal gives a pasted block: nothing it kills reaches pytest
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        start_new_session=True,
    )


def _last_python_of_its_section(block: Block) -> bool:
    same = [b for b in RUNNABLE if b.lang == "python" and b.section == block.section]
    return block is same[-1]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else [])
        for b in RUNNABLE
        if b.lang == "sh" or _last_python_of_its_section(b)
    ],
)
def test_every_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    if not block.runnable_text().strip():
        pytest.skip(f"README line {block.line}: every line dropped by its directives")
    done = _run_block(block, _scratch(tmp_path), timeout_s=840)
    assert done.returncode == 0, (
        f"README line {block.line} ({block.section}) exited {done.returncode}\n"
        f"--- stdout\n{_tail(done.stdout)}\n--- stderr\n{_tail(done.stderr)}"
    )


def _tail(text: str, n_lines: int = 25) -> str:
    """The last lines of an output, a progress bar's redrawn lines reduced to their last state."""
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln.strip())[-n_lines * 200 :].split("\n", 1)[-1]
