"""python -m lean.plot RUN [RUN...] [--out FILE]: training curves from runs' metrics.jsonl, as a picture.

Three panels: every loss (the median of a window of 20 iterations, and at each evaluation the same loss
on the held-out images, dotted) and the learning rate against iterations, and bbox and segm AP against
epochs; several runs share the axes, to compare them.
lean.train draws OUT/curves.png after every epoch the same way. matplotlib is optional
(pip install -e '.[plot]'); without it, one line says so and nothing else changes.
"""

import json
import statistics
from collections import defaultdict, deque
from pathlib import Path

from lean.cli import Parser, run
from lean.errors import LeanError
from lean.files import write_atomically
from lean.images import png_marked

INSTALL = "pip install -e '.[plot]' (matplotlib)"
WINDOW = 20


class PlotUnavailable(LeanError):
    """matplotlib is not installed."""


def read_metrics(run_folder):
    """(losses {name: [(iteration, window median)]}, [(iteration, lr)], {"bbox"/"segm": [(epoch, AP)]}, lines
    skipped) of a run. A line that is not one of lean's records (half a line from a killed run, anything
    else) is skipped and counted: curves are a view of the run and never stop it."""
    path = Path(run_folder) / "metrics.jsonl"
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as error:
        raise LeanError(f"{path}: cannot read ({error.strerror or error})") from None
    losses, rates, precision = defaultdict(list), [], defaultdict(list)
    windows = defaultdict(lambda: deque(maxlen=WINDOW))
    skipped = 0
    for line in lines:
        record = _record(line)
        if record is None:
            skipped += 1
            continue
        if "loss" in record:
            for name, value in record.items():
                if name.startswith("loss"):
                    windows[name].append(value)
                    losses[name].append((record["iteration"], statistics.median(windows[name])))
        elif "val_loss" in record:  # one point an evaluation, each the mean over the held-out images
            for name, value in record.items():
                if name.startswith("val_loss"):
                    losses[name].append((record["iteration"], value))
        elif "lr" in record:
            rates.append((record["iteration"], record["lr"]))
        for kind in ("bbox", "segm"):
            if kind in record:
                precision[kind].append((record["epoch"], record[kind][0]))
    return losses, rates, precision, skipped


def _record(line):
    """The record a metrics line holds, where it is one that lean.train writes and the curves read; else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    numbers = [value for name, value in record.items() if name.startswith(("loss", "val_loss")) or name == "lr"]
    if numbers and not (_is_int(record.get("iteration")) and all(_is_number(value) for value in numbers)):
        return None
    for kind in ("bbox", "segm"):
        if kind in record:
            values = record[kind]
            if not (_is_int(record.get("epoch")) and isinstance(values, list) and values and _is_number(values[0])):
                return None
    return record


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def draw_curves(run_folders, out):
    """Draw the curves of `run_folders` into the PNG `out` (written atomically); returns (`out`, how many lines
    of their metrics were not records and were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        raise PlotUnavailable(f"drawing curves needs matplotlib: {INSTALL}") from None
    figure, (loss_axes, lr_axes, ap_axes) = pyplot.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    several = len(run_folders) > 1  # then a colour a run and a line style a loss; else a colour a loss
    styles = ("-", "--", ":", "-.", (0, (1, 4)), (0, (5, 2, 1, 2)))
    skipped = 0
    for k, folder in enumerate(run_folders):
        losses, rates, precision, unread = read_metrics(folder)
        skipped += unread
        run_name = f"{Path(folder).name} " if several else ""
        trained = [name for name in losses if not name.startswith("val_")]
        for name, points in losses.items():
            validation = name.startswith("val_")
            base = name.removeprefix("val_")
            j = trained.index(base) if base in trained else len(trained)  # a validation loss takes its loss's colour
            colour, style = (f"C{k}", styles[j % len(styles)]) if several else (f"C{j}", "-")
            loss_axes.plot(*zip(*points), linestyle=":" if validation else style, marker="o" if validation else None,
                           markersize=4, color=colour, label=run_name + name)  # fmt: skip
        if rates:
            lr_axes.plot(*zip(*rates), color=f"C{k}", label=run_name.strip() or None)
        for j, (marker, kind) in enumerate((("o", "bbox"), ("s", "segm"))):
            if precision[kind]:
                epochs, values = zip(*precision[kind])
                colour = f"C{k}" if several else f"C{j}"
                ap_axes.plot([e + 1 for e in epochs], values, marker=marker, color=colour, label=run_name + kind)
    loss_axes.set(title="losses (median of 20 iterations; val_: held-out images)", xlabel="iteration", yscale="log")
    lr_axes.set(title="learning rate", xlabel="iteration")
    ap_axes.set(title="AP on the held-out images", xlabel="epochs done", ylim=(0, 1))
    for axes in (loss_axes, lr_axes, ap_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    write_atomically(out, lambda temporary: figure.savefig(temporary, format="png", dpi=90))
    pyplot.close(figure)
    return out, skipped


MARK = "lean.evaluate"  # in the PNGs' text: what --plots may draw over
EVALUATION_PLOTS = ("pr_curves.png", "confusion_matrix.png")


def draw_evaluation(report, folder):
    """pr_curves.png (each class's precision against recall at IoU 0.5 and over 0.5:0.95, for each kind the
    report scored) and confusion_matrix.png (at IoU 0.5, background row and column) in `folder`, written
    atomically; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise PlotUnavailable(f"drawing plots needs matplotlib: {INSTALL}") from None
    folder = Path(folder)
    kinds = [kind for kind in ("bbox", "segm") if kind in report]
    figure, axes = pyplot.subplots(len(kinds), 2, figsize=(11, 4.6 * len(kinds)), squeeze=False, layout="constrained")
    for row, kind in zip(axes, kinds):
        for panel, (key, what) in zip(row, (("iou50", "IoU 0.5"), ("iou50_95", "IoU 0.5:0.95"))):
            for name, curve in report[kind]["pr_curves"].items():
                points = [(r, p) for r, p in zip(curve["recall"], curve[key]) if p > -1]
                if points:
                    ap = sum(p for _, p in points) / len(points)  # the AP printed
                    panel.plot(*zip(*points), label=f"{name} {ap:.3f}")
            panel.set(title=f"{kind}, {what}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
            panel.grid(alpha=0.3)
            if panel.get_legend_handles_labels()[0]:
                panel.legend(fontsize="small", title="class, AP")
    written = [_save(figure, folder / EVALUATION_PLOTS[0], pyplot)]
    confusion = report["bbox"]["confusion"]
    matrix, labels = confusion["matrix"], confusion["labels"]
    size = 2.5 + 0.45 * len(labels)
    figure, panel = pyplot.subplots(figsize=(size + 1, size), layout="constrained")
    image = panel.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=panel)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            panel.text(j, i, value, ha="center", va="center", fontsize="small")
    panel.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    panel.set_yticks(range(len(labels)), labels)
    panel.set(xlabel="true", ylabel="predicted",
              title=f"boxes at IoU {confusion['iou']}, scores from {confusion['score_thresh']}")  # fmt: skip
    written.append(_save(figure, folder / EVALUATION_PLOTS[1], pyplot))
    return written


def _save(figure, path, pyplot):
    write_atomically(
        path, lambda temporary: figure.savefig(temporary, format="png", dpi=90, metadata={"Software": MARK})
    )
    pyplot.close(figure)
    return path


def drawn_by_evaluation(path):
    """Whether the file at `path` is a picture draw_evaluation drew (they carry its mark)."""
    return png_marked(path, MARK)


class Curves:
    """A run's curves.png, drawn again after every epoch; without matplotlib, one line the first time, and the
    run goes on."""

    def __init__(self, folder):
        self.folder, self.said = Path(folder), False

    def update(self):
        """Redraw; returns the line to print, if any. Nothing here stops a run: curves are a view of it."""
        try:
            draw_curves([self.folder], self.folder / "curves.png")
        except LeanError as error:  # matplotlib missing, a metrics file or a picture that cannot be read or written
            if not self.said:
                self.said = True
                return f"no curves.png: {error}; training goes on"
        return None

    def evaluation(self, report):
        """Draw the run's last evaluation (draw_evaluation); returns the line to print."""
        try:
            paths = draw_evaluation(report, self.folder)
        except LeanError as error:
            return f"no {' or '.join(EVALUATION_PLOTS)}: {error}"
        return f"the last evaluation drawn: {', '.join(str(path) for path in paths)}"


def parse_args(argv):
    parser = Parser(prog="python -m lean.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="default: RUN/curves.png for one run, curves.png for several")
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not (folder / "metrics.jsonl").is_file():
            parser.error(f"argument runs: {folder} holds no metrics.jsonl")
    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        parser.error(f"argument --out: {args.out} cannot be written (a folder, or in a folder that does not exist)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = args.out or (args.runs[0] / "curves.png" if len(args.runs) == 1 else Path("curves.png"))
    path, skipped = draw_curves(args.runs, out)
    unread = f"; skipped {skipped} lines of metrics that are not lean.train's records" if skipped else ""
    print(f"wrote {path}{unread}")
    return 0


if __name__ == "__main__":
    run(main)
