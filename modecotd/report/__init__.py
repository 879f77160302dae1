"""The run report, rebuilt from the artifacts alone: report.json (:mod:`.collect`), report.md and
report.html (:mod:`.markdown`), PNG plots (:mod:`.plots`)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from modecotd.artifacts import write_json
from modecotd.plan import RunLayout
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
    layout = RunLayout(storage)
    report = collect(storage)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_json(folder / "report.json", report)
        plot_accuracy(report, folder / "accuracy.png")
        curves = training_curves(storage)
        if curves:
            plot_training(curves, folder / "training.png")
        if any(t.get("mixtures") for t in report["tasks"].values()):
            plot_mixture_weights(report, folder / "mixture_weights.png")
            plot_search(search_curves(storage), folder / "search.png")
        text = render_markdown(report)
        (folder / "report.md").write_text(text)
        write_html(text, folder / "report.html")
        for file in sorted(folder.iterdir()):  # report.md last: it is what says the report is there
            if file.name != "report.md":
                storage.upload(file, layout.report(file.name))
        storage.upload(folder / "report.md", layout.report("report.md"))
    return str(storage.local_root / "report.md") if storage.is_local else storage.describe("report.md")

