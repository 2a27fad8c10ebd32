"""Command-line helpers shared by ``scripts/`` and ``benchmarks/``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["drop_options"]


def drop_options(argv: Sequence[str], valued: Iterable[str], flags: Iterable[str] = ()) -> list[str]:
    """``argv`` without the options ``valued`` (each with its value: ``--x v`` or ``--x=v``) and
    ``flags`` (no value); to pass a command line on to a child process that sets those itself."""
    valued, flags = set(valued), set(flags)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in valued:
            skip = True
        elif a.split("=")[0] not in valued | flags:
            out.append(a)
    return out
