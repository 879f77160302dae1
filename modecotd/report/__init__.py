"""The run report, rebuilt from the artifacts alone: report.json (:mod:`.collect`), report.md and
report.html (:mod:`.markdown`), PNG plots (:mod:`.plots`)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from modecotd.artifacts import write_json
from modecotd.units import ReportFiles
from modecotd.report.collect import SYSTEMS, as_storage, collect, correct_field, eval_rows, pair_rows, \
    search_curves, task_facts, training_curves, worst_pairs
from modecotd.report.markdown import percent, render_markdown, write_html
from modecotd.report.plots import plot_accuracy, plot_mixture_weights, plot_search, plot_training
from modecotd.storage import Storage

__all__ = ["SYSTEMS", "build_report", "collect", "correct_field", "eval_rows", "pair_rows", "percent", "task_facts",
           "worst_pairs"]


def build_report(run: "Storage | str | Path") -> str:
    """Write report.json, report.md, report.html and the plots (accuracy, training curves, mixture
    weights, search curves) into the run's storage, from its artifacts alone; returns where
    report.md is (a path for a local folder)."""
    storage = as_storage(run)
    report = collect(storage)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_json(folder / ReportFiles.JSON, report)
        plot_accuracy(report, folder / ReportFiles.ACCURACY_PLOT)
        curves = training_curves(storage)
        if curves:
            plot_training(curves, folder / ReportFiles.TRAINING_PLOT)
        if any(t.get("mixtures") for t in report["tasks"].values()):
            plot_mixture_weights(report, folder / ReportFiles.WEIGHTS_PLOT)
            plot_search(search_curves(storage), folder / ReportFiles.SEARCH_PLOT)
        text = render_markdown(report)
        (folder / ReportFiles.MARKDOWN).write_text(text)
        write_html(text, folder / ReportFiles.HTML)
        for file in sorted(folder.iterdir()):  # report.md last: it is what says the report is there
            if file.name != ReportFiles.MARKDOWN:
                storage.upload(file, file.name)
        storage.upload(folder / ReportFiles.MARKDOWN, ReportFiles.MARKDOWN)
    return str(storage.local_root / ReportFiles.MARKDOWN) if storage.is_local else storage.describe(ReportFiles.MARKDOWN)

