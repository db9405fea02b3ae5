"""Self-contained HTML reports: every plot and image is embedded as a base64 PNG, so
the file opens offline and can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harmonize.data.io import atomic_write

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto}.note{color:#555;font-size:0.9em}
.scroll{overflow-x:auto;max-width:100%}figure{margin:1em 0}
.answer{background:#eef5ff;border-left:4px solid #2a6fdb;padding:0.6em 1em;font-size:1.05em}
.back{font-size:0.9em}
"""
ACRONYMS = {"auc": "AUC", "ssim": "SSIM", "psnr": "PSNR", "ci": "CI", "frd": "FRD",
            "mmd": "MMD", "roi": "ROI", "cam": "CAM", "id": "ID", "db": "dB", "pca": "PCA",
            "lo": "low", "hi": "high", "p05": "(p < 0.05)", "sd": "SD"}


def header_text(column: str) -> str:
    """A column name as a reader wants it: words, not snake_case ("auc_lo" -> "AUC low")."""
    return " ".join(ACRONYMS.get(w, w) for w in str(column).split("_"))


def cell_text(value) -> str:
    """Numbers rounded to what can be read (3 significant digits), missing values as a dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "\u2013"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)



def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, dpi=None, **kwargs):
    """`pyplot.subplots` without pyplot: a `Figure` that belongs to no GUI backend and no
    global figure list, so importing and plotting change nothing in the user's process
    (no `matplotlib.use`, nothing to close)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class HtmlReport:
    """Collects sections in order and writes them as one HTML file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []

    def answer(self, text: str) -> None:
        """The report's answer in a sentence or two: what a reader needs if they read
        nothing else (put it first)."""
        self._parts.append(f'<p class="answer">{html.escape(text)}</p>')

    def back_link(self, href: str, text: str) -> None:
        self._parts.append(f'<p class="back"><a href="{html.escape(href)}">&larr; '
                           f"{html.escape(text)}</a></p>")

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def link(self, href: str, text: str) -> None:
        """A relative link to a companion file (reports that belong together)."""
        self._parts.append(f'<p>See <a href="{html.escape(href)}">{html.escape(text)}</a>.</p>')

    def table(self, df: pd.DataFrame, first: list[str] | None = None) -> None:
        """A readable table: worded headers, rounded numbers, dashes for missing values,
        the `first` columns (e.g. the worst numbers) moved to the front, and a horizontal
        scroll bar instead of spilling past the page when it is still too wide."""
        cols = [c for c in (first or []) if c in df.columns]
        df = df[cols + [c for c in df.columns if c not in cols]]
        shown = pd.DataFrame({header_text(c): [cell_text(v) for v in df[c]]
                              for c in df.columns})
        self._parts.append('<div class="scroll">' + shown.to_html(index=False, border=0,
                                                                   escape=True) + "</div>")

    def figure(self, fig, caption: str = "") -> None:
        self._embed(figure_to_data_uri(fig), caption)

    def image(self, path: str | os.PathLike, caption: str = "") -> None:
        """An existing PNG, embedded (the report stays one file)."""
        self._embed("data:image/png;base64," + base64.b64encode(Path(path).read_bytes())
                    .decode(), caption)

    def _embed(self, uri: str, caption: str) -> None:
        self._parts.append(f'<figure><img src="{uri}">'
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
               row_titles: list[str] | None = None, cell_inches: float = 2.2,
               outlines: list[np.ndarray | None] | None = None, colorbar: str | None = None):
    """A matplotlib figure of model-space images (0..1 shown as black..white); RGB cells
    (e.g. heat-map overlays) as they are. `outlines`: one mask per row (or None), drawn
    as a red contour on every cell of that row (where the finding is); `colorbar`: a label
    for an inferno 0..1 colour bar (for heat-map overlays)."""
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = subplots(n_rows, n_cols, figsize=(cell_inches * n_cols,
                                                      cell_inches * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        mask = outlines[r] if outlines else None
        for c, img in enumerate(row):
            ax = axes[r][c]
            img = np.asarray(img)
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
            if mask is not None and mask.any():
                m = _resize_mask(mask, img.shape[:2])
                ax.contour(m, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout()
    if colorbar:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), "inferno"), ax=axes.ravel().tolist(),
                           fraction=0.02, pad=0.01)
        bar.set_label(colorbar, fontsize=8)
    return fig


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(shape):
        return mask.astype(float)
    from scipy.ndimage import zoom

    return zoom(mask.astype(float), (shape[0] / mask.shape[0], shape[1] / mask.shape[1]),
                order=0)
