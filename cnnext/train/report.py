"""What a training run leaves behind: metrics.csv, curves.png, confusion.csv, and the
text the user reads (the epoch line, the confusion matrix)."""
import csv
import os

__all__ = ["COLUMNS", "write_metrics", "read_metrics", "plot_curves", "write_confusion", "format_confusion",
           "epoch_line"]

COLUMNS = ("epoch", "train_loss", "train_acc", "test_acc", "seconds")


def _replace(path, write):
    """Writes through a temporary file and renames it over `path`: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_metrics(path, history):
    """metrics.csv: one row per epoch (COLUMNS); losses and accuracies with 6 decimals."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for row in history:
                w.writerow([row["epoch"], f"{row['train_loss']:.6f}", f"{row['train_acc']:.6f}",
                            f"{row['test_acc']:.6f}", f"{row['seconds']:.3f}"])
    _replace(path, write)


def read_metrics(path):
    """metrics.csv back as a list of dicts (epoch int, the rest float)."""
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(path, history, epochs, title=""):
    """curves.png: train loss, train accuracy and test accuracy against the epoch, on one
    pair of axes from epoch 1 to `epochs`, as the d2l book's Animator draws them. Uses
    matplotlib's Agg canvas directly (pyplot's global state and backend are left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [r["epoch"] for r in history]
    ax.plot(x, [r["train_loss"] for r in history], "-", label="train loss")
    ax.plot(x, [r["train_acc"] for r in history], "m--", label="train acc")
    ax.plot(x, [r["test_acc"] for r in history], "g-.", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs, 2))
    top = max([1.0] + [r["train_loss"] for r in history if r["train_loss"] == r["train_loss"]])
    ax.set_ylim(0, min(top, 3.0) * 1.05)
    ax.grid(True)
    ax.legend(loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _replace(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_confusion(path, matrix, classes):
    """confusion.csv: rows are the true class, columns the predicted class (counts)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted"] + list(classes))
            for name, row in zip(classes, matrix.tolist()):
                w.writerow([name] + row)
    _replace(path, write)


def format_confusion(matrix, classes, max_classes=20):
    """The confusion matrix as text (true class per row, predicted per column)."""
    k = len(classes)
    if k > max_classes:
        return f"(confusion matrix of {k} classes not printed; see confusion.csv)"
    names = [str(c)[:8] for c in classes]
    width = max([len(n) for n in names] + [len(str(int(matrix.max()))) if matrix.numel() else 1])
    head = " " * (width + 2) + " ".join(n.rjust(width) for n in names) + "   <- predicted"
    lines = [head]
    for name, row in zip(names, matrix.tolist()):
        lines.append(name.rjust(width) + "  " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def epoch_line(row, epochs, images_per_s):
    return (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  train loss {row['train_loss']:.4f}  "
            f"train acc {row['train_acc']:.4f}  test acc {row['test_acc']:.4f}  "
            f"{row['seconds']:.1f} s ({images_per_s:,.0f} img/s)")
