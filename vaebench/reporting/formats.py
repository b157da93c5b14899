"""A PaperTable written out: LaTeX (booktabs), Markdown or CSV, one function each."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable

from vaebench.reporting.paper_table import PaperTable, Row

# the characters LaTeX reads as commands, and the non-ASCII ones vaebench writes itself; [ ] and *
# in braces, as \\ and \midrule read a [ or * that follows them as their own optional argument
LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "[": "{[}", "]": "{]}", "*": "{*}",
    "%": r"\%", "_": r"\_", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
    "±": r"\ensuremath{\pm}", "−": r"\ensuremath{-}", "×": r"\ensuremath{\times}",
    "–": "--", "—": "---", "β": r"\ensuremath{\beta}", "τ": r"\ensuremath{\tau}",
}
BREAKS = ("Cc", "Zl", "Zp")  # Unicode categories that may end a line
MARKDOWN_SPECIALS = set("\\`*_[]<>|")
NEGATIVE = re.compile(r"(?<![\w.])-(?=\d)")  # the sign of "-99.45", not the hyphen of "mlp-e50"


def _plain(text: str) -> str:
    """One line: control characters (newlines, tabs) and line separators become spaces."""
    return "".join(" " if unicodedata.category(c) in BREAKS else c for c in str(text))


def latex_escape(text: str) -> str:
    escaped = "".join(LATEX_ESCAPES.get(c, c) for c in _plain(text))
    return NEGATIVE.sub(lambda _: r"\ensuremath{-}", escaped)


def markdown_escape(text: str) -> str:
    return "".join("\\" + c if c in MARKDOWN_SPECIALS else c for c in _plain(text))


def _cells(row: Row, escape: Callable[[str], str], bold: str, published: str,
           marker: str) -> list[str]:
    """A row's cells escaped, its best value in ``bold`` and a published figure's label in
    ``published`` (format strings of one ``{}``), its note's ``marker`` after the label."""
    cells = [escape(cell) for cell in row.cells]
    if row.bold is not None:
        cells[row.bold] = bold.format(cells[row.bold])
    if row.published:
        cells[0] = published.format(cells[0])
    if row.note:
        cells[0] += marker.format(row.note)
    return cells


def render_latex(table: PaperTable) -> str:
    """A ``tabular`` with booktabs rules (``\\usepackage{booktabs}``), then its notes."""
    width = len(table.header)
    lines = [
        "% vaebench report table; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{l{'r' * (width - 1)}}}",
        "\\toprule",
        " & ".join(latex_escape(cell) for cell in table.header) + r" \\",
    ]
    for group in table.groups:
        lines.append("\\midrule")
        if table.grouped:
            lines.append(f"\\multicolumn{{{width}}}{{l}}{{\\textit{{{latex_escape(group.label)}}}}}"
                         r" \\")
        first_published = True
        for row in group.rows:
            if row.published and first_published:
                lines.append(f"\\cmidrule{{1-{width}}}")
                first_published = False
            cells = _cells(row, latex_escape, r"\textbf{{{}}}", r"\textit{{{}}}",
                           r"\textsuperscript{{{}}}")
            lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}", "", "\\par\\smallskip", "{\\footnotesize"]
    for marker, text in table.notes:
        prefix = f"\\textsuperscript{{{latex_escape(marker)}}} " if marker else ""
        lines.append(f"{prefix}{latex_escape(text)}\\par")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_markdown(table: PaperTable) -> str:
    """A pipe table (a bold row names each group where there are several), then its notes."""
    width = len(table.header)
    lines = [
        "| " + " | ".join(markdown_escape(cell) for cell in table.header) + " |",
        "|---|" + "---:|" * (width - 1),
    ]
    for group in table.groups:
        if table.grouped:
            lines.append(f"| **{markdown_escape(group.label)}** |" + " |" * (width - 1))
        for row in group.rows:
            cells = _cells(row, markdown_escape, "**{}**", "*{}*", "<sup>{}</sup>")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for marker, text in table.notes:
        prefix = f"<sup>{markdown_escape(marker)}</sup> " if marker else ""
        lines += [f"{prefix}{markdown_escape(text)}", ""]
    return "\n".join(lines)


def render_csv(table: PaperTable) -> str:
    """A row per variant and per published figure: its group, whether it is published, the
    table's cells and a published figure's note (the notes on the whole table are left out)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["compared_within", "source", *table.header, "note"])
    for group in table.groups:
        for row in group.rows:
            source = "published" if row.published else "this grid"
            cells = [group.label, source, *row.cells, table.note(row.note)]
            writer.writerow([_plain(cell) for cell in cells])
    return out.getvalue()


# --format NAME -> (the file written beside leaderboard.csv, its renderer)
FORMATS: dict[str, tuple[str, Callable[[PaperTable], str]]] = {
    "latex": ("table.tex", render_latex),
    "markdown": ("table.md", render_markdown),
    "csv": ("table.csv", render_csv),
}
