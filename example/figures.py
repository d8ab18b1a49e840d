"""Figures: drawn off-screen, saved whole or not at all."""

from __future__ import annotations

from pathlib import Path

from influence import write_atomically


def subplots(*args, **kwargs):
    """matplotlib's (figure, axes), drawn off-screen (no display needed); save with save_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path) -> None:
    """Lay a matplotlib figure out and save it whole or not at all, creating its folder."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=150), folder="--figure")
    finally:
        plt.close(fig)
