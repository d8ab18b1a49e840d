"""Figures: drawn off-screen, saved whole or not at all."""

from __future__ import annotations

import textwrap
from pathlib import Path

from influence import write_atomically


def subplots(*args, **kwargs):
    """matplotlib's (figure, axes), drawn off-screen (no display needed); save with save_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def suptitle(fig, text: str, fontsize: float) -> None:
    """The figure's title, wrapped to the figure's width as drawn (a one-panel figure is narrower than most titles),
    the figure made taller by the lines it adds."""
    renderer, width = fig.canvas.get_renderer(), 0.95 * fig.get_figwidth() * fig.dpi
    for chars in range(len(text), 20, -4):
        title = fig.suptitle("\n".join(textwrap.wrap(text, chars)), fontsize=fontsize)
        if title.get_window_extent(renderer).width <= width:
            break
    added = title.get_text().count("\n")
    fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + added * 1.2 * fontsize / 72)


def save_figure(fig, path: str | Path) -> None:
    """Lay a matplotlib figure out and save it whole or not at all, creating its folder."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=150), folder="--figure")
    finally:
        plt.close(fig)
