"""One table renderer for every command that prints rows: ``skyvm status``, ``skyvm check``, ``skyvm plan``.

Holds ``render``: rows (mappings or sequences) and their columns in, plain text out, one line per row
and a header of upper-cased column names. In a terminal (stdout a tty) a table wider than the terminal
fits it: its widest cells wrap onto more lines. Piped or captured, cells are never wrapped or cut, so a
cluster name, a path or an error message stays on one line that grep (or a test) finds whole. Cell
text is shown as it is (no rich markup, no emoji codes).

May import: rich only (no skyvm module), so any module can use it without an import cycle.
"""

from __future__ import annotations

import io
import shutil
import sys
from typing import Any, Mapping, Optional, Sequence, Union

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

Row = Union[Mapping[str, Any], Sequence[Any]]

# Two spaces between columns, none at the edges: the layout skyvm's commands have always printed.
_GAP = 2


def _cell(row: Row, index: int, column: str) -> str:
    value = row.get(column, "") if isinstance(row, Mapping) else row[index]
    return "" if value is None else str(value)


def terminal_width() -> Optional[int]:
    """The terminal's width when stdout is one; None when piped or captured (no width to fit)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def render(rows: Sequence[Row], columns: Sequence[str], *, headers: Optional[Sequence[str]] = None, width: Optional[int] = -1) -> str:
    """The rows as an aligned table. A mapping row gives ``row[column]`` (blank when missing); a
    sequence row gives its cells in column order. ``headers`` default to the column names upper-cased.
    ``width``: the most columns of text a line may take (wider cells wrap); None: no limit; by
    default the terminal's width when stdout is a terminal, else no limit."""
    width = terminal_width() if width == -1 else width
    headers = [c.upper() for c in columns] if headers is None else list(headers)
    cells = [[_cell(row, i, c) for i, c in enumerate(columns)] for row in rows]
    widest = sum(max([cell_len(h), *(max(map(cell_len, c[i].splitlines() or [""])) for c in cells)]) + _GAP for i, h in enumerate(headers))
    fit = width is not None and widest + 1 > width
    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, _GAP // 2), header_style="", highlight=False)
    for header in headers:
        # Too wide for the terminal: rich shrinks the widest columns, their cells folding onto more lines.
        table.add_column(Text(header), no_wrap=not fit, overflow="fold" if fit else "ignore")
    for line in cells:
        table.add_row(*(Text(text) for text in line))
    out = io.StringIO()
    # Else as wide as the widest row can be: rich then never shrinks, wraps or cuts a column.
    Console(file=out, width=width if fit else widest + 1, color_system=None, force_terminal=False, markup=False, emoji=False, highlight=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
