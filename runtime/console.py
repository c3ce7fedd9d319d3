"""The rich consoles of the command line and of ``run`` / ``demo`` / ``bench``.

On a terminal, rich lays tables out in the terminal's width (wrapping cells, names folded
rather than cut). When the output is not a terminal (piped, redirected, captured), rich would
assume 80 columns (or the width of whatever terminal stdin or stderr is) and cut long names
with an ellipsis; here there is no width limit then, so every name and message is whole.
"""
from __future__ import annotations

from rich.console import Console, ConsoleDimensions

UNLIMITED = 100_000     # columns: wider than any line opforge prints


class OpforgeConsole(Console):
    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(UNLIMITED, size.height)

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)


def make_console(**kwargs) -> OpforgeConsole:
    """soft_wrap: error reports and printed IR keep their lines whatever the width."""
    return OpforgeConsole(**{"highlight": False, "soft_wrap": True, **kwargs})
