"""Whether a command may write the file it was given (`--out`, `--plot`): checked before any work.

Each launcher writes one kind of file. A path of another kind (a run's metrics.jsonl given as a report's
--out), a folder, a file in the way of a folder, or a place nobody can write is refused in one line;
an earlier output is replaced only where the command says so (a report, a plot) or with --overwrite.
"""

from __future__ import annotations

import os
from pathlib import Path


def file_problem(option: str, out: Path, suffixes: tuple[str, ...], example: str,
                 overwrite: bool | None = None, beside: tuple[Path, ...] = ()) -> str | None:
    """What is wrong with writing `out` (and the files `beside` it), or None.

    `suffixes`: the kinds this command writes, the first one suggested (empty: any name); `overwrite` None:
    an existing file of that kind is replaced (a report, a plot), else only with --overwrite."""
    if out.is_dir():
        return f"{option} {out}: is a folder; give a file name such as {out / example}"
    if suffixes and out.suffix.lower() not in suffixes:
        return (f"{option} {out}: give a file name ending in {' or '.join(suffixes)} (this command writes no other "
                f"kind of file), e.g. {out.with_suffix(suffixes[0])}")
    present = [path for path in (out, *beside) if path.exists()]
    if present and overwrite is False:
        return f"{option} {present[0]}: exists; choose another file or pass --overwrite to replace it"
    return folder_problem(option, out.parent, out)


def folder_problem(option: str, folder: Path, named: Path) -> str | None:
    """None when `folder` exists as a writable folder or can be created: the nearest existing ancestor
    must be a folder we may write into, not a file in the way."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        return f"{option} {named}: {existing} is a file, not a folder; choose another place"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {named}: cannot write under {existing}; choose another place"
    return None
