"""A report as a list of plain blocks, written out twice: a self-contained HTML page and Markdown beside it.

HTML: inline CSS, every plot a PNG in a `data:` URI, no script and nothing fetched, so the one file opens
anywhere, offline. Markdown: the same blocks, with the plots as PNG files in a folder next to it. Text from a run
(completions of a random model, config values) is escaped for each format, control characters included.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str  # `code` spans are the only markup


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    marked: bool = False  # every row highlighted (e.g. the settings that differ between runs)
    text_columns: tuple[int, ...] = ()  # columns of free text (prompts, completions): kept as written, wrapped


@dataclass
class Image:
    name: str  # file stem, unique in the report
    png: bytes
    alt: str
    width: int
    height: int


@dataclass
class Figures:
    images: list[Image]


@dataclass
class Code:
    text: str


@dataclass
class Details:
    summary: str
    blocks: list = field(default_factory=list)
    open: bool = False


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1180px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 26px; border-bottom: 1px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 20px; margin-top: 32px; border-bottom: 1px solid #eaeef2; padding-bottom: 4px; }
h3 { font-size: 16px; margin-top: 20px; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
pre { background: #f6f8fa; padding: 10px 12px; border-radius: 6px; overflow-x: auto; font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.txt { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; white-space: pre-wrap;
         max-width: 420px; overflow-wrap: anywhere; }
table.marked td { background: #fff8c5; }
.figs { display: flex; flex-wrap: wrap; gap: 10px; }
.figs img { border: 1px solid #eaeef2; border-radius: 4px; max-width: 100%; height: auto; }
details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Control characters (other than newline and tab) as `\\xNN`, so that they can be seen and cannot break a page.

    >>> visible("a\\x00b\\tc")
    'a\\\\x00b\\tc'
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _inline_html(text: str) -> str:
    parts = visible(text).split("`")
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(parts))


def to_html(title: str, blocks: list) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_table(b: Table) -> str:
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
    rows = []
    for row in b.rows:
        cells = "".join(
            f'<td class="txt">{html.escape(visible(c))}</td>' if i in b.text_columns else f"<td>{_inline_html(c)}</td>"
            for i, c in enumerate(row)
        )
        rows.append(f"<tr>{cells}</tr>")
    cls = ' class="marked"' if b.marked else ""
    return f"<table{cls}>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def _html_details(b: Details) -> str:
    inner = "\n".join(_html_block(x) for x in b.blocks)
    return f"<details{' open' if b.open else ''}>\n<summary>{_inline_html(b.summary)}</summary>\n{inner}\n</details>"


_HTML = {
    Heading: lambda b: f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>",
    Text: lambda b: f"<p>{_inline_html(b.text)}</p>",
    Table: _html_table,
    Figures: lambda b: '<div class="figs">\n' + "\n".join(_html_image(i) for i in b.images) + "\n</div>",
    Code: lambda b: f"<pre>{html.escape(visible(b.text))}</pre>",
    Details: _html_details,
}


def _html_block(b) -> str:
    return _HTML[type(b)](b)


def _html_image(i: Image) -> str:
    data = base64.b64encode(i.png).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(i.alt)}" width="{i.width}" '
            f'height="{i.height}">')  # fmt: skip


def _md_cell(text: str, free: bool) -> str:
    """One table cell: pipes escaped, newlines as <br>; free text also has its HTML and Markdown characters
    escaped, so a completion shows as written."""
    text = visible(text)
    if free:
        text = html.escape(text, quote=False)
        text = re.sub(r"([\\`*_\[\]#~])", r"\\\1", text)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def to_markdown(blocks: list, image_dir: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the images it links, as {relative path: PNG bytes}."""
    images: dict[str, bytes] = {}
    lines: list[str] = []
    for b in blocks:
        lines += _md_block(b, image_dir, images)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n", images


def _md_table(b: Table, image_dir: str, images: dict[str, bytes]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h, False) for h in b.header) + " |", "|" + "---|" * len(b.header)]
    for row in b.rows:
        cells = [_md_cell(c, i in b.text_columns) for i, c in enumerate(row)]
        if b.marked:
            cells = [f"**{c}**" if c.strip() else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _md_figures(b: Figures, image_dir: str, images: dict[str, bytes]) -> list[str]:
    links = []
    for i in b.images:
        rel = f"{image_dir}/{i.name}.png"
        images[rel] = i.png
        links.append(f"![{i.alt}]({rel})")
    return [" ".join(links)]


def _md_details(b: Details, image_dir: str, images: dict[str, bytes]) -> list[str]:
    out = [f"<details{' open' if b.open else ''}><summary>{html.escape(visible(b.summary))}</summary>", ""]
    for x in b.blocks:
        out += _md_block(x, image_dir, images) + [""]
    return out + ["</details>"]


_MARKDOWN = {
    Heading: lambda b, *_: ["#" * b.level + " " + visible(b.text)],
    Text: lambda b, *_: [visible(b.text)],
    Table: _md_table,
    Figures: _md_figures,
    Code: lambda b, *_: ["```", visible(b.text).rstrip("\n").replace("```", "`\u200b``"), "```"],
    Details: _md_details,
}


def _md_block(b, image_dir: str, images: dict[str, bytes]) -> list[str]:
    return _MARKDOWN[type(b)](b, image_dir, images)
