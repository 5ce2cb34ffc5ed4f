"""Small Markdown helpers for asset metadata and reports."""

from __future__ import annotations

import polars as pl


def markdown_table(df: pl.DataFrame, float_digits: int = 3) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            if abs(value) < 1e-3:
                return f"{value:.{float_digits}g}"
            return f"{value:,.{float_digits}f}".rstrip("0").rstrip(".")
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(df.columns) + " |\n| " + " | ".join("---" for _ in df.columns) + " |\n"
    return header + "\n".join("| " + " | ".join(cell(v) for v in row) + " |" for row in df.rows())
