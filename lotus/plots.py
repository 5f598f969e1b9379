"""Figures (matplotlib, headless). Each function draws one picture into a PNG file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_tickets_figure(
    path: str | Path,
    images: torch.Tensor,
    scores: torch.Tensor | None,
    keep_idx: torch.Tensor,
    grid: int,
    title: str = "",
    *,
    boxes: torch.Tensor | None = None,
) -> Path:
    """Like the LOTUS paper's Figure 3: each image with its dropped patches greyed out, above
    the heat map of its patch scores (None: random tickets, whose scores show nothing).

    Args:
        images: (n, 3, H, W) uint8.
        scores: (n, N) patch scores, N = grid * grid, or None.
        keep_idx: (n, K) kept patch indices.
        boxes: optional (n, 4) object boxes [x0, x1) x [y0, y1) in pixels of `images` (float;
            a row of NaN: no box), outlined over the kept patches.
    """
    import torch

    plt = pyplot()
    n = len(images)
    cols = min(n, 8)
    per_image = 1 if scores is None else 2
    rows = per_image * -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    H = images.shape[-1]
    patch = H // grid
    for i in range(n):
        kept = torch.zeros(grid * grid, dtype=torch.bool)
        kept[keep_idx[i]] = True
        mask = kept.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # (H, W)
        img = images[i].permute(1, 2, 0).float() / 255
        grey = torch.full_like(img, 0.5)
        shown = torch.where(mask[..., None], img, 0.25 * img + 0.75 * grey)
        r, c = per_image * (i // cols), i % cols
        axes[r][c].imshow(shown.numpy(), interpolation="nearest")
        if boxes is not None and not boxes[i].isnan().any():
            _outline(axes[r][c], boxes[i].tolist())
        if scores is not None:
            axes[r + 1][c].imshow(scores[i].view(grid, grid).numpy(), cmap="inferno", interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_ylabel("kept", fontsize=8)
    if scores is not None:
        axes[1][0].set_ylabel("score", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _outline(ax, box: list[float]) -> None:
    """Draw the box [x0, x1) x [y0, y1) (pixel edges) on an imshow axis, whose pixel centres are whole numbers."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = box
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.2))


def save_sweep_figure(
    path: str | Path, rows: list[dict], dense_accuracy: float, knee: float, tolerance: float, split: str = "validation"
) -> Path:
    """Like the LOTUS paper's Figure 2: accuracy on `split` against one-shot sparsity, the knee marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [100 * r["sparsity"] for r in rows]
    ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label="one-shot magnitude pruning")
    ax.axhline(dense_accuracy, color="grey", linestyle="--", linewidth=1, label=f"dense {dense_accuracy:.2f}%")
    ax.axhspan(dense_accuracy - tolerance, dense_accuracy, color="grey", alpha=0.15, label=f"tolerance {tolerance:g} pt")
    ax.axvline(100 * knee, color="tab:red", linestyle=":", label=f"essential sparsity {100 * knee:g}%")
    ax.set(xlabel="sparsity of the prunable weights (%)", ylabel=f"{split} accuracy (%)", title="Essential sparsity sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_stage_figure(path: str | Path, accuracies: dict[str, float | None]) -> Path:
    """Test accuracy after each pipeline stage that has one."""
    plt = pyplot()
    names = [k for k, v in accuracies.items() if v is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bars = ax.bar(names, [accuracies[k] for k in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(ylabel="test accuracy (%)", title="Accuracy per stage")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_finetune_figure(path: str | Path, history: list[dict], dense_accuracy: float) -> Path:
    """Fine-tuning curves: test accuracy and training loss per epoch, the dense accuracy for reference."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.plot(epochs, [h["test_accuracy"] for h in history], marker="o", label="compressed, lottery data")
    ax_acc.axhline(dense_accuracy, color="grey", linestyle="--", label="dense baseline")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Fine-tuning")
    ax_acc.legend(fontsize=8)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
