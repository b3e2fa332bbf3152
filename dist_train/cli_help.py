"""One look for every command's `--help` and one way to refuse its bad options.

Each option shows its default, and the epilog lists the exit codes.

argparse's ArgumentDefaultsHelpFormatter prints "(default: None)" for options whose default is decided
later (by the config, by another option); those say in their own words what happens, and this formatter
leaves them alone. The epilog keeps its line breaks, so exit codes and examples read as written.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" where X means something, never to a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], (), argparse.SUPPRESS)
        if "default" in text or action.required or unset:
            return text
        return super()._get_help_string(action)


def exit_codes(codes: dict[int, str]) -> str:
    """The epilog every command ends its help with: `exit codes:` then one `  N  meaning` line per code."""
    return "\n".join(["exit codes:", *(f"  {code}  {meaning}" for code, meaning in sorted(codes.items()))])


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and a mistake on the command line reported in one line, exit 2:
    argparse's own report puts the whole usage block above the line that matters."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
