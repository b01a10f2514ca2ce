"""Packed host rows: a step's captured values, one uint8 row per token.

After each step the recorder copies the traced rows to the host as one uint8
array [n, width] whose columns are fixed byte ranges (:class:`RowLayout`). A
request's chunks are row ranges of such arrays, one array per step; finishing a
request concatenates one slice per chunk, not one per column, and reads every
column back as a view (bench/HISTORY.md, "Decode-heavy work: what the capture
costs", item 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np


@dataclass(frozen=True)
class Column:
    """Bytes [offset, offset + nbytes) of every row: one value of ``shape`` per token."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * prod(self.shape)


class RowLayout:
    """Byte layout of one token's row; columns are laid out widest item first, so
    every column is aligned to its item size and rows to the widest."""

    def __init__(self, columns: list[tuple[str, np.dtype, tuple[int, ...]]]):
        ordered = sorted(columns, key=lambda column: -np.dtype(column[1]).itemsize)
        self.columns: dict[str, Column] = {}
        offset = 0
        for name, dtype, shape in ordered:
            column = Column(np.dtype(dtype), tuple(shape), offset)
            self.columns[name] = column
            offset += column.nbytes
        widest = max(column.dtype.itemsize for column in self.columns.values())
        self.width = -(-offset // widest) * widest

    def empty(self, n: int) -> np.ndarray:
        """Uninitialised rows for ``n`` tokens: uint8 [n, width]."""
        return np.empty((n, self.width), np.uint8)

    def view(self, rows: np.ndarray, name: str) -> np.ndarray:
        """Column ``name`` of ``rows`` (uint8 [..., width]) as a writable view
        [..., *shape]."""
        column = self.columns[name]
        raw = rows[..., column.offset:column.offset + column.nbytes]
        return raw.view(column.dtype).reshape(*rows.shape[:-1], *column.shape)
