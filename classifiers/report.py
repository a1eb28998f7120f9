"""Reports of trial results: the lecture-style table, report.json, report.md and PNG plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import textwrap
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """One row: a method's test accuracies (fractions) over its trials, and what it cost."""

    name: str
    accuracies: list[float]
    seconds: float
    settings: dict
    lecture: tuple[float, float] | None = None   # the published range, in percent
    histories: list[dict] = field(default_factory=list)
    note: str = ""

    def summary(self) -> dict:
        acc = np.asarray(self.accuracies, dtype=float)
        stats = {"min": float(acc.min()), "max": float(acc.max()), "mean": float(acc.mean())} if len(acc) else \
            {"min": None, "max": None, "mean": None}
        return {"accuracies": [float(a) for a in acc], **stats, "seconds": round(self.seconds, 3),
                "trials": len(acc), "settings": self.settings, **({"note": self.note} if self.note else {})}

    def verdict(self) -> str:
        """Where the mean falls against the lecture's range."""
        if self.lecture is None or not self.accuracies:
            return ""
        mean = 100 * float(np.mean(self.accuracies))
        low, high = self.lecture
        return "within" if low <= mean <= high else ("above" if mean > high else "below")


@dataclass
class ExperimentResult:
    name: str
    description: str
    methods: list[MethodResult]
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"description": self.description,
                "methods": {m.name: m.summary() for m in self.methods},
                "lecture": {m.name: list(m.lecture) for m in self.methods if m.lecture},
                **self.details}


def environment() -> dict:
    import sklearn

    versions = {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__}
    try:
        import keras
        import tensorflow as tf

        versions |= {"tensorflow": tf.__version__, "keras": keras.__version__}
    except ImportError:
        pass
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "versions": versions, "date": datetime.now().isoformat(timespec="seconds")}


def format_table(experiment: ExperimentResult) -> str:
    """The lecture's form: method, accuracy min-max and mean over trials, seconds, the published range."""
    rows = [("method", "trials", "accuracy min-max", "mean", "seconds", "lecture", "")]
    for m in experiment.methods:
        s = m.summary()
        if s["trials"]:
            acc_range, mean = f"{100 * s['min']:.1f}-{100 * s['max']:.1f}%", f"{100 * s['mean']:.1f}%"
        else:
            acc_range, mean = "-", "-"
        lecture = f"{m.lecture[0]:.1f}-{m.lecture[1]:.1f}%" if m.lecture else ""
        rows.append((m.name, str(s["trials"]), acc_range, mean, f"{m.seconds:.1f}", lecture, m.verdict()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{experiment.name}: {experiment.description}"]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])] + [row[-1]]
        lines.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            lines.append("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
    notes = [f"{m.name}: {m.note}" for m in experiment.methods if m.note]
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def format_markdown(experiments: list[ExperimentResult], header: str = "") -> str:
    out = [f"# Results\n\n{header}".rstrip() + "\n"]
    for experiment in experiments:
        out.append(f"\n## {experiment.name}\n\n{experiment.description}\n")
        out.append("| method | trials | accuracy min-max | mean | seconds | lecture | |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for m in experiment.methods:
            s = m.summary()
            acc = f"{100 * s['min']:.1f}-{100 * s['max']:.1f}%" if s["trials"] else "-"
            mean = f"{100 * s['mean']:.1f}%" if s["trials"] else "-"
            lecture = f"{m.lecture[0]:.1f}-{m.lecture[1]:.1f}%" if m.lecture else ""
            out.append(f"| {m.name} | {s['trials']} | {acc} | {mean} | {m.seconds:.1f} | {lecture} | {m.verdict()} |")
        notes = [f"- **{m.name}**: {m.note}" for m in experiment.methods if m.note]
        notes += [f"- {line}" for line in experiment.details.get("notes", [])]
        if notes:
            out.append("\n" + "\n".join(notes))
    return "\n".join(out) + "\n"


def plot_accuracies(experiment: ExperimentResult, path: Path) -> None:
    """Accuracy of every trial per method (dots), with the lecture's published range (bars)."""
    plt = _pyplot()
    methods = [m for m in experiment.methods if m.accuracies]
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(methods) + 1.6))
    for row, m in enumerate(methods):
        if m.lecture:
            ax.barh(row, m.lecture[1] - m.lecture[0], left=m.lecture[0], height=0.6, color="#f4c27a", alpha=0.7,
                    label="lecture range" if row == 0 or not any(x.lecture for x in methods[:row]) else None)
        jitter = np.linspace(-0.15, 0.15, len(m.accuracies)) if len(m.accuracies) > 1 else [0]
        ax.scatter(100 * np.asarray(m.accuracies), row + np.asarray(jitter), s=14, color="#2b6cb0", zorder=3,
                   label="trials" if row == 0 else None)
        ax.plot([100 * np.mean(m.accuracies)] * 2, [row - 0.3, row + 0.3], color="#1a202c", lw=2, zorder=4,
                label="mean" if row == 0 else None)
    ax.set_yticks(range(len(methods)), [textwrap.fill(m.name, 34) for m in methods], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"{experiment.name}: accuracy per trial")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_learning_curves(experiment: ExperimentResult, path: Path) -> bool:
    """Per-epoch training and validation accuracy (mean over trials, band = min-max) where recorded."""
    methods = [m for m in experiment.methods if m.histories and "accuracy" in m.histories[0]]
    if not methods:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, m in enumerate(methods):
        color = plt.cm.tab10(k % 10)
        for key, style in (("accuracy", "--"), ("val_accuracy", "-")):
            if key not in m.histories[0]:
                continue
            curves = 100 * np.array([h[key] for h in m.histories])
            epochs = np.arange(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), style, color=color, label=f"{m.name} ({'test' if 'val' in key else 'train'})")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{experiment.name}: learning curves (mean over trials, band = min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_sweeps(experiment: ExperimentResult, path: Path) -> bool:
    """Accuracy against learning rate (log) per optimiser, for every row with a sweep in its settings:
    validation accuracy (what the pick sees, dashed) and test accuracy where every point was tested."""
    sweeps = [(m.name, m.settings["sweep"]) for m in experiment.methods if "sweep" in m.settings]
    if not sweeps:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.2), squeeze=False)
    for ax, (name, sweep) in zip(axes[0], sweeps):
        optimizers = list(dict.fromkeys(p["optimizer"] for p in sweep["points"]))
        for k, optimizer in enumerate(optimizers):
            points = sorted((p for p in sweep["points"] if p["optimizer"] == optimizer), key=lambda p: p["learning_rate"])
            rates = [p["learning_rate"] for p in points]
            color = plt.cm.tab10(k % 10)
            ax.plot(rates, [100 * p["validation_mean"] for p in points], "o--", color=color,
                    label=f"{optimizer} (validation)")
            if all("test_mean" in p for p in points):
                ax.plot(rates, [100 * p["test_mean"] for p in points], "s-", color=color, label=f"{optimizer} (test)")
        chosen = next(p for p in sweep["points"] if (p["optimizer"], p["learning_rate"]) ==
                      (sweep["chosen"]["optimizer"], sweep["chosen"]["learning_rate"]))
        ax.plot([chosen["learning_rate"]], [100 * chosen["validation_mean"]], "*", color="black", markersize=14,
                label="picked (validation)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("accuracy (%), mean over trials")
        ax.set_title(textwrap.fill(f"{experiment.name}: {name}", 60), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_times(timings: dict[str, dict[str, float]], path: Path) -> None:
    """Seconds per experiment's full table, classic vs cached (log scale)."""
    plt = _pyplot()
    names = list(timings)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(names))
    for offset, (key, color) in zip((-0.2, 0.2), (("classic", "#c05621"), ("cached", "#2f855a"))):
        values = [timings[n].get(key, np.nan) for n in names]
        bars = ax.bar(x + offset, values, width=0.4, color=color, label=key)
        for bar, value in zip(bars, values):
            if np.isfinite(value):
                ax.annotate(_seconds(value), (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("seconds for the full table (log)")
    ax.set_title("time per experiment: classic freeze-and-retrain vs cached features")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _seconds(value: float) -> str:
    return f"{value / 3600:.1f} h" if value >= 3600 else f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def new_run_dir(root: Path, latest: str = "latest") -> Path:
    """runs/<timestamp>/, with runs/<latest> pointing at it."""
    run = root / datetime.now().strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while run.exists():
        run = root / f"{run.name.split('.')[0]}.{suffix}"
        suffix += 1
    run.mkdir(parents=True)
    latest = root / latest
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run.name)
    return run


def write_report(run_dir: Path, experiments: list[ExperimentResult], extra: dict | None = None,
                 timings: dict[str, dict[str, float]] | None = None, header: str = "") -> list[Path]:
    """report.json, report.md and the plots; returns the paths written."""
    report = {"experiments": {e.name: e.as_dict() for e in experiments}, "environment": environment(),
              **(extra or {})}
    written = [run_dir / "report.json", run_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(format_markdown(experiments, header))
    for experiment in experiments:
        accuracy_plot = run_dir / f"{experiment.name}-accuracy.png"
        plot_accuracies(experiment, accuracy_plot)
        written.append(accuracy_plot)
        curves = run_dir / f"{experiment.name}-learning-curves.png"
        if plot_learning_curves(experiment, curves):
            written.append(curves)
        sweeps = run_dir / f"{experiment.name}-sweeps.png"
        if plot_sweeps(experiment, sweeps):
            written.append(sweeps)
    if timings:
        plot_times(timings, run_dir / "time-classic-vs-cached.png")
        written.append(run_dir / "time-classic-vs-cached.png")
    return written
