"""The one plain-text table every command prints: a header row, a rule, aligned columns.

Example:
    >>> print(text_table([("name", "ms"), ("dense", "1.20"), ("pruned", "0.40")], right=(1,)))
    name      ms
    ------------
    dense   1.20
    pruned  0.40
"""

from __future__ import annotations


def text_table(rows, *, rule: bool = True, right: tuple[int, ...] = ()) -> str:
    """``rows`` of strings, the first the header; columns in ``right`` are right-aligned; ``rule``: a
    line of dashes under the header."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
             for r in rows]
    if rule:
        lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
