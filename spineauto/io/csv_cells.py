"""CSV cells a spreadsheet will not run: every CSV we write passes its cells through :func:`escape`.

A cell beginning with ``= + - @`` (or a tab / carriage return) is a formula to Excel and LibreOffice:
a case named ``=HYPERLINK("http://...")`` would become a live link (or worse) in a colleague's
spreadsheet. Such a text cell is written with a leading ``'`` (OWASP's advice), which spreadsheets
show as text; numbers (``-0.5``) are left as they are. Readers of our own CSVs undo it with
:func:`unescape`.
"""
from __future__ import annotations

import csv
from typing import Any, Iterable

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape(value: Any) -> Any:
    """``value``, with a ``'`` before a text that a spreadsheet would take for a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


def escape_row(row: Iterable[Any] | dict) -> list | dict:
    """A row (a sequence, or a dict for ``csv.DictWriter``) with every cell escaped."""
    if isinstance(row, dict):
        return {k: escape(v) for k, v in row.items()}
    return [escape(v) for v in row]


def unescape(value: str) -> str:
    """A cell as :func:`escape` found it."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA_START):
        return value[1:]
    return value


class _Escaping:
    """A ``csv.writer`` / ``csv.DictWriter`` whose rows are escaped (:func:`escape_row`) on the way out."""

    def __init__(self, writer):
        self._writer = writer

    def writerow(self, row):
        return self._writer.writerow(escape_row(row))

    def writerows(self, rows):
        for row in rows:
            self.writerow(row)

    def writeheader(self):
        return self.writerow(dict(zip(self._writer.fieldnames, self._writer.fieldnames)))


def writer(f, **kwargs) -> _Escaping:
    """``csv.writer(f, **kwargs)`` with every cell escaped: the one way we write CSV rows."""
    return _Escaping(csv.writer(f, **kwargs))


def dict_writer(f, fieldnames, **kwargs) -> _Escaping:
    """``csv.DictWriter(f, fieldnames, **kwargs)`` with every cell (and header) escaped."""
    return _Escaping(csv.DictWriter(f, fieldnames=fieldnames, **kwargs))
