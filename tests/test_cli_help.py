"""Every command's `--help`, read as a user reads it: each option explains itself and shows its default,
and the help ends with the exit codes. Runs each script under launch/ and shards/ as a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted(str(path.relative_to(REPO)) for folder in ("launch", "shards")
                 for path in (REPO / folder).glob("*.py"))
SUBCOMMANDS = {"launch/submit.py": ["status", "tail"], "shards/build.py": ["verify"]}
COMMANDS = SCRIPTS + [f"{script} {sub}" for script, subs in SUBCOMMANDS.items() for sub in subs]
SECTION = re.compile(r"^\S.*:$")  # "options:", "positional arguments:", "resources (...):"


def entries(help_text: str) -> list[tuple[str, str]]:
    """(invocation, help) for every argument argparse lists; the epilog (from "exit codes") is not one."""
    body = re.split(r"^exit codes", help_text, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)[0]
    found: list[list[str]] = []
    in_section = False
    for line in body.splitlines()[1:]:
        if SECTION.match(line):
            in_section = True
        elif not line.strip():
            in_section = False
        elif in_section and re.match(r"^  \S", line):
            invocation, _, text = line.strip().partition("  ")
            found.append([invocation, text.strip()])
        elif in_section and found:
            found[-1][1] = f"{found[-1][1]} {line.strip()}".strip()
    return [(invocation, text) for invocation, text in found]


def required_in_usage(usage: str, flag: str) -> bool:
    """A flag the usage line shows outside every [...] is required."""
    for match in re.finditer(re.escape(flag) + r"(?=[\s\]|)])", usage):
        before = usage[:match.start()]
        if before.count("[") == before.count("]"):
            return True
    return False


def problems(help_text: str) -> list[str]:
    usage = help_text.split("\n\n", 1)[0]
    found = []
    for invocation, text in entries(help_text):
        flag = invocation.split(",")[-1].split()[0]
        takes_value = " " in invocation.split(",")[-1].strip()
        if not text:
            found.append(f"{invocation}: no help text")
        elif flag.startswith("-") and takes_value and not required_in_usage(usage, flag) and "default" not in text:
            found.append(f"{flag}: help does not say its default")
    epilog = re.split(r"^exit codes", help_text, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)
    if len(epilog) < 2 or not {"0", "2"} <= set(re.findall(r"\b\d\b", epilog[1])):
        found.append("no 'exit codes' epilog listing 0 and 2")
    return found


def test_parser_reads_argparse_layout():
    """The reader itself, on a hand-written help text with each kind of mistake."""
    text = ("usage: x.py [-h] --out OUT [--size SIZE] [--seed SEED] [--flag]\n\nDoes x.\n\noptions:\n"
            "  -h, --help   show this help message and exit\n  --out OUT    where\n"
            "  --size SIZE  side\n               (default: 512)\n  --seed SEED\n  --flag       on\n\n"
            "exit codes: 0 ok; 2 bad input\n")
    assert entries(text)[2] == ("--size SIZE", "side (default: 512)")
    assert problems(text) == ["--seed SEED: no help text"]
    assert problems(text.replace("(default: 512)", "(512 px)")) == ["--size: help does not say its default",
                                                           "--seed SEED: no help text"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    result = subprocess.run([sys.executable, *command.split(), "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = problems(result.stdout)
    if command == "shards/build.py" and "verify" not in result.stdout:
        found.append("does not mention the `verify` subcommand")
    assert not found, f"{command} --help:\n" + "\n".join(found)
