"""Figures for reports: log-log ROC curves, sample grids, trade-off scatter plots.

Every function writes one PNG and returns its path. Matplotlib runs on the non-interactive Agg
backend, so plotting works on machines without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, path, title: str = ""
) -> Path:
    """Plot ROC curves on log-log axes, where attacks at low FPR are visible.

    Args:
      curves: label -> (fpr, tpr) arrays of one ROC curve each.
      path: output PNG path.
    """
    figure, axis = plt.subplots(figsize=(5.5, 5))
    floor = 1e-4
    for label, (fpr, tpr) in curves.items():
        axis.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=label, linewidth=1.2)
    grid = np.logspace(-4, 0, 50)
    axis.plot(grid, grid, "k--", linewidth=0.8, label="chance")
    axis.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1))
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return _save(figure, path)


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str],
    path,
    per_class: int = 8,
    title: str = "",
) -> Path:
    """Plot the first `per_class` images of every class, one row per class.

    Args:
      images: (N, H, W, C) float32 in [-1, 1].
      labels: (N,) int32.
    """
    num_classes = len(class_names)
    figure, axes = plt.subplots(
        num_classes, per_class, figsize=(per_class * 0.8 + 1.5, num_classes * 0.8 + 0.4)
    )
    axes = np.asarray(axes).reshape(num_classes, per_class)
    for row, name in enumerate(class_names):
        chosen = images[np.asarray(labels) == row][:per_class]
        for column in range(per_class):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(chosen):
                picture = (np.clip(chosen[column], -1, 1) + 1) / 2
                if picture.shape[-1] == 1:
                    axis.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1)
                else:
                    axis.imshow(picture)
            if column == 0:
                axis.set_ylabel(str(name), rotation=0, ha="right", va="center", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def tradeoff(
    points: Sequence[Mapping],
    *,
    x: str,
    y: str,
    label: str,
    path,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    front: bool = False,
) -> Path:
    """Scatter `points` (dicts) by two numeric keys, each labelled, optionally with the Pareto
    front that maximises y while minimising x."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    xs = np.array([p[x] for p in points], float)
    ys = np.array([p[y] for p in points], float)
    axis.scatter(xs, ys, s=18)
    for point, px, py in zip(points, xs, ys, strict=True):
        axis.annotate(
            str(point[label]), (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    if front and len(points):
        order = np.lexsort((-ys, xs))
        best, front_x, front_y = -np.inf, [], []
        for index in order:
            if ys[index] > best:
                best = ys[index]
                front_x.append(xs[index])
                front_y.append(ys[index])
        axis.step(
            front_x, front_y, where="post", color="tab:red", linewidth=1, label="Pareto front"
        )
        axis.legend(fontsize=7)
    axis.set(xlabel=x_label or x, ylabel=y_label or y, title=title)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
