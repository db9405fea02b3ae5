"""Self-contained HTML reports: every plot and image is embedded as a base64 PNG, so
the file opens offline and can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harmonize.data.io import atomic_write  # noqa: E402

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%}.note{color:#555;font-size:0.9em}
"""


def figure_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class HtmlReport:
    """Collects sections in order and writes them as one HTML file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def link(self, href: str, text: str) -> None:
        """A relative link to a companion file (reports that belong together)."""
        self._parts.append(f'<p>See <a href="{html.escape(href)}">{html.escape(text)}</a>.</p>')

    def table(self, df: pd.DataFrame, float_format: str = "{:.4g}") -> None:
        formatters = {c: float_format.format for c in df.columns
                      if pd.api.types.is_float_dtype(df[c])}
        self._parts.append(df.to_html(index=False, formatters=formatters, border=0,
                                      escape=True))

    def figure(self, fig, caption: str = "") -> None:
        self._parts.append(f'<figure><img src="{figure_to_data_uri(fig)}">'
                           f"<figcaption class=note>{html.escape(caption)}</figcaption></figure>")

    def render(self) -> str:
        body = "\n".join(self._parts)
        return (f"<!doctype html><html><head><meta charset='utf-8'>"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>"
                f"<body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.render()
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def image_grid(rows: list[list[np.ndarray]], column_titles: list[str],
               row_titles: list[str] | None = None, cell_inches: float = 2.2):
    """A matplotlib figure of model-space images (0..1 shown as black..white)."""
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols,
                                                      cell_inches * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(np.asarray(img), cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout()
    return fig
