"""Classification metrics per head: accuracy, balanced accuracy, macro-F1, per-class recall and the
confusion matrix (JSON and PNG), and the evaluation of a prediction folder against a labels file.

Conventions (scikit-learn's): rows of the confusion matrix are the true class, columns the
predicted one. Balanced accuracy and macro-F1 average only over the classes present in the truth
(a class absent from the evaluated cases has no recall to speak of). A labels file is either a
dataset.json (its ``cases.<case>.classes``) or a CSV with columns ``case,head,class``.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.evaluation.files import check_writable, read_json_file, writing
from spineauto.io.atomic import read_json, write_atomic, write_json
from spineauto.schema import to_dict

log = logging.getLogger(__name__)


@dataclass
class HeadMetrics:
    head: str
    classes: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    per_class_recall: dict[str, float | None]  # None: class absent from the truth
    confusion: list[list[int]]  # [true][predicted]

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for logs and W&B: ``{prefix}{head}/accuracy`` ..."""
        p = f"{prefix}{self.head}/"
        out = {f"{p}accuracy": self.accuracy, f"{p}balanced_accuracy": self.balanced_accuracy, f"{p}macro_f1": self.macro_f1}
        out.update({f"{p}recall_{c}": r for c, r in self.per_class_recall.items() if r is not None})
        return out


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str], head: str = "") -> HeadMetrics:
    cm = np.asarray(cm, dtype=np.int64)
    n = int(cm.sum())
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(float)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return HeadMetrics(
        head=head, classes=list(classes), n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class_recall={c: (float(r) if ok else None) for c, r, ok in zip(classes, recall, present)},
        confusion=cm.tolist(),
    )


def head_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], head: str = "") -> HeadMetrics:
    """All metrics of one head from class indices."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, len(classes)), classes, head)


def plot_confusion(metrics: HeadMetrics, path: Path, title: str | None = None) -> Path:
    """Confusion matrix as a PNG (counts, with row-normalised colour), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics.confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(metrics.classes)
    size = 1.6 + 0.7 * k
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), metrics.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), metrics.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"{metrics.head}: bal. acc {metrics.balanced_accuracy:.3f}, n={metrics.n}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    try:
        write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"), suffix=".png")
    finally:
        plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- labels files


def read_labels(path: Path) -> dict[str, dict[str, str]]:
    """case -> {head: class} from a dataset.json (``cases``) or a CSV ``case,head,class``."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise SpineautoError(f"{path}: labels file not found; pass a dataset.json or a CSV with columns case,head,class")
    if path.suffix.lower() == ".json":
        data = read_json_file(path, "the labels file")
        cases = data.get("cases") if isinstance(data, dict) else None
        if not isinstance(cases or {}, dict):
            raise SpineautoError(f"{path}: not a valid dataset.json (expected \"cases\": {{case: {{\"classes\": {{head: class}}}}}})")
        out = {}
        for c, info in (cases or {}).items():
            classes = info.get("classes") if isinstance(info, dict) else None
            if classes and not isinstance(classes, dict):
                raise SpineautoError(f"{path}: cases.{c}.classes must be {{head: class}}, got {classes!r}")
            if classes:
                out[c] = dict(classes)
        return out
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"case", "head", "class"} - set(reader.fieldnames or [])
            if missing:
                raise SpineautoError(f"{path}: CSV lacks column(s) {sorted(missing)}; expected a header case,head,class")
            out: dict[str, dict[str, str]] = {}
            for row in reader:
                if None in (row["case"], row["head"], row["class"]):
                    raise SpineautoError(f"{path}: line {reader.line_num} has fewer than the columns case,head,class")
                out.setdefault(row["case"].strip(), {})[row["head"].strip()] = row["class"].strip()
    except OSError as e:
        raise SpineautoError(f"{path}: cannot read the labels file ({e.strerror or type(e).__name__})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SpineautoError(f"{path}: not a readable CSV labels file ({e}); expected a text file with columns case,head,class") from None
    return out


def read_predictions(folder: Path) -> dict[str, dict[str, str]]:
    """case -> {head: predicted class} from the ``<case>.json`` files written by predict."""
    from spineauto.inference.classify import PREDICTION_KIND

    out = {}
    for p in sorted(Path(folder).glob("*.json")):
        if not p.is_file():
            continue
        try:
            data = read_json(p)
        except ValueError:
            continue
        except OSError as e:
            raise SpineautoError(f"{p}: cannot read the prediction ({e.strerror or type(e).__name__})") from None
        if isinstance(data, dict) and data.get("kind") == PREDICTION_KIND:
            try:
                out[str(data["case"])] = {h: v["class"] for h, v in data["heads"].items()}
            except (KeyError, TypeError, AttributeError):
                raise SpineautoError(f"{p}: a classification prediction without \"case\" and \"heads\": {{head: {{\"class\": ...}}}}; "
                                     "predict the case again") from None
    return out


@dataclass
class ClassificationReport:
    heads: dict[str, HeadMetrics]
    cases: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # case -> head -> {true, predicted}
    missing: list[str] = field(default_factory=list)  # labelled cases without a prediction


def evaluate_classification(predictions: Mapping[str, Mapping[str, str]], labels: Mapping[str, Mapping[str, str]],
                            heads: Mapping[str, Sequence[str]] | None = None) -> ClassificationReport:
    """Metrics per head over the cases that have both a prediction and a label for that head.

    ``heads`` fixes the class order (from the model's plans); otherwise classes are collected from
    labels and predictions in sorted order.
    """
    head_names = list(heads) if heads else sorted({h for p in predictions.values() for h in p})
    report = ClassificationReport(heads={})
    report.missing = sorted(c for c, lab in labels.items() if c not in predictions and any(h in lab for h in head_names))
    for head in head_names:
        pairs = [(c, labels[c][head], predictions[c][head]) for c in sorted(predictions)
                 if c in labels and head in labels[c] and head in predictions[c]]
        if not pairs:
            log.warning("no labelled case for head %s", head)
            continue
        classes = list(heads[head]) if heads else sorted({t for _, t, _ in pairs} | {p for _, _, p in pairs})
        unknown = sorted({t for _, t, _ in pairs} - set(classes))
        if unknown:
            raise SpineautoError(f"labels for head {head!r} use class(es) {unknown} the model does not know ({classes}); fix the labels file")
        idx = {c: i for i, c in enumerate(classes)}
        report.heads[head] = head_metrics([idx[t] for _, t, _ in pairs], [idx[p] for _, _, p in pairs], classes, head)
        for c, t, p in pairs:
            report.cases.setdefault(c, {})[head] = {"true": t, "predicted": p}
    return report


REPORT_HINT = "choose another output with -o"


def write_report(report: ClassificationReport, out_dir: Path, name: str = "summary_classification") -> Path:
    """``<name>.json`` with every head's metrics and per-case results, plus ``confusion_<head>.png``."""
    out_dir = Path(out_dir)
    with writing(out_dir, "the classification report", REPORT_HINT):
        for head, m in report.heads.items():
            plot_confusion(m, out_dir / f"confusion_{head}.png")
        return write_json(out_dir / f"{name}.json", {"heads": {h: to_dict(m) for h, m in report.heads.items()},
                                                      "missing_predictions": report.missing, "cases": report.cases})


def evaluate_prediction_folder(folder: Path, labels_file: Path, heads: Mapping[str, Sequence[str]] | None = None,
                               out_dir: Path | None = None) -> ClassificationReport:
    """``spineauto evaluate`` for classification: predictions in ``folder`` against ``labels_file``."""
    if not Path(folder).is_dir():
        raise SpineautoError(f"{folder}: prediction folder not found")
    check_writable(Path(out_dir or folder) / "summary_classification.json", "the classification report", REPORT_HINT)
    predictions = read_predictions(folder)
    if not predictions:
        raise SpineautoError(f"{folder}: no classification predictions (<case>.json from `spineauto predict`) found")
    if heads is None:
        csv_path = Path(folder) / "classification.csv"
        heads = _heads_from_csv(csv_path) if csv_path.is_file() else None
    report = evaluate_classification(predictions, read_labels(labels_file), heads)
    if not report.heads:
        raise SpineautoError(f"{labels_file}: no label matches a predicted case and head in {folder}; check case names and heads")
    write_report(report, out_dir or Path(folder))
    return report


def _heads_from_csv(path: Path) -> dict[str, list[str]]:
    """Class order per head from the probability columns ``<head>_p_<class>`` of classification.csv."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    heads: dict[str, list[str]] = {}
    for col in header:
        if "_p_" in col:
            h, c = col.split("_p_", 1)
            heads.setdefault(h, []).append(c)
    return heads


def print_report(console, report: ClassificationReport, written: Path) -> None:
    """A rich table per head (for the CLI)."""
    from rich.markup import escape
    from rich.table import Table

    for head, m in report.heads.items():
        table = Table(title=f"{escape(head)}: {m.n} case(s)", title_justify="left")
        for c in ("accuracy", "balanced accuracy", "macro-F1", *[f"recall {c}" for c in m.classes]):
            table.add_column(escape(c), justify="right")
        table.add_row(f"{m.accuracy:.3f}", f"{m.balanced_accuracy:.3f}", f"{m.macro_f1:.3f}",
                      *["-" if r is None else f"{r:.3f}" for r in m.per_class_recall.values()])
        console.print(table)
    if report.missing:
        console.print(f"{len(report.missing)} other labelled case(s) in the labels file have no prediction here (not evaluated; "
                      "listed in missing_predictions)")
    console.print(f"[green]wrote[/] {escape(str(written))}")
