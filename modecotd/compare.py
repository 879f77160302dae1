"""`modecotd compare`: two runs, or two systems of one run, question by question: per task the
difference in accuracy with a paired bootstrap interval and the exact McNemar p-value."""
from __future__ import annotations

from modecotd.config_loading import read_yaml
from modecotd.errors import UserError
from modecotd.plan import RunLayout
from modecotd.report import SYSTEMS, percent, correct_field, eval_rows, pair_rows
from modecotd.run_view import RunView
from modecotd.stats import mcnemar_test, paired_bootstrap_diff_ci
from modecotd.storage import Storage


def compare(run_a: Storage, run_b: Storage | None = None, system_a: str | None = None,
            system_b: str | None = None, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Per task, the accuracy of system B (in run B) minus that of system A (in run A) on the
    questions both answered, paired by their id (when every row has one) or their question text,
    with a paired bootstrap 95% interval of the difference and the exact McNemar p-value.

    Without ``run_b`` two systems of ``run_a`` are compared (both systems must be named). Without
    systems, two runs are compared on every system both evaluated. Raises UserError when a system
    was never evaluated or a task's questions do not pair."""
    if run_b is None:
        if not (system_a and system_b):
            raise UserError("give a second run, or --system and --system-b to compare two systems of one run")
        run_b = run_a
    config_a, config_b = _config(run_a), _config(run_b)
    view_a, view_b = RunView(run_a), RunView(run_b)
    tasks_b = {t["name"] for t in config_b["tasks"]}
    tasks = [t["name"] for t in config_a["tasks"] if t["name"] in tasks_b]
    if not tasks:
        raise UserError(f"{run_a.describe()} and {run_b.describe()} share no task")
    for view, system in ((view_a, system_a), (view_b, system_b or system_a)):
        if system:
            _require_system(view, tasks, system)
    systems = [(system_a, system_b or system_a)] if system_a else None
    scoring_a, scoring_b = config_a["evaluation"]["scoring"], config_b["evaluation"]["scoring"]
    rows = []
    for task in tasks:
        for name_a, name_b in systems or [(s, s) for s in evaluated_systems(view_a, task)]:
            rows_a, rows_b = eval_rows(view_a, task, name_a), eval_rows(view_b, task, name_b)
            if rows_a is None or rows_b is None:
                continue
            pairs, key = pair_rows(rows_a, rows_b)
            if not pairs:
                raise UserError(f"{task}: no question of {run_a.describe()} ({name_a}) pairs with one of "
                                f"{run_b.describe()} ({name_b}), paired by {key}; were they run on the same test set?")
            a = [bool(ra.get(correct_field(scoring_a))) for ra, _ in pairs]
            b = [bool(rb.get(correct_field(scoring_b))) for _, rb in pairs]
            low, high = paired_bootstrap_diff_ci(a, b, resamples=resamples, seed=seed)
            accuracy_a, accuracy_b = sum(a) / len(a), sum(b) / len(b)
            rows.append({"task": task, "system_a": name_a, "system_b": name_b, "n": len(pairs),
                         "unpaired_a": len(rows_a) - len(pairs), "unpaired_b": len(rows_b) - len(pairs),
                         "accuracy_a": accuracy_a, "accuracy_b": accuracy_b, "diff": accuracy_b - accuracy_a,
                         "ci_low": low, "ci_high": high, "mcnemar_p": mcnemar_test(a, b)})
    if not rows:
        raise UserError(f"no task has a system evaluated in both {run_a.describe()} and {run_b.describe()}")
    return {"a": run_a.describe(), "b": run_b.describe(), "scoring": {"a": scoring_a, "b": scoring_b},
            "resamples": resamples, "rows": rows}


def _config(storage: Storage) -> dict:
    layout = RunLayout(storage)
    if not storage.exists(layout.config):
        raise UserError(f"{storage.describe()}: no modecotd run there (no {layout.config})")
    return read_yaml(storage.read_text(layout.config), f"{storage.describe()}/{layout.config}")


def evaluated_systems(view: RunView, task: str) -> list[str]:
    """The systems with a current evaluation on ``task``, in the run's plan's order (a run planned
    before plans named them: the standard ones first)."""
    names = {prefix.rsplit("/", 1)[1] for prefix in view.units_under(view.layout.evaluation(task, ""))}
    planned = view.planned_systems(task)
    if planned is not None:
        return [name for name in planned if name in names]
    return sorted(names, key=lambda name: (SYSTEMS.index(name) if name in SYSTEMS else len(SYSTEMS), name))


def _require_system(view: RunView, tasks: list[str], system: str) -> None:
    if any(view.manifest(view.layout.evaluation(task, system)) for task in tasks):
        return
    evaluated = sorted({s for task in tasks for s in evaluated_systems(view, task)})
    raise UserError(f"{view.storage.describe()}: system {system!r} was not evaluated on any shared task "
                    f"(evaluated: {', '.join(evaluated) or 'none'})")


def render_comparison(result: dict) -> str:
    """The comparison as a markdown table (accuracies and differences in points)."""
    same_run = result["a"] == result["b"]
    lines = [f"Run: {result['a']}" if same_run else f"A: {result['a']}\nB: {result['b']}",
             f"Scoring: A {result['scoring']['a']}, B {result['scoring']['b']}. diff = B - A in points; "
             f"95% CI: paired bootstrap ({result['resamples']} resamples); p: exact McNemar.",
             "",
             "| task | system A | system B | n paired | acc A | acc B | diff | 95% CI | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['system_a']} | {r['system_b']} | {r['n']} | {percent(r['accuracy_a'])} | "
                     f"{percent(r['accuracy_b'])} | {100 * r['diff']:+.1f} | "
                     f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] | {_p_text(r['mcnemar_p'])} |")
    unpaired = [r for r in result["rows"] if r["unpaired_a"] or r["unpaired_b"]]
    if unpaired:
        lines += [""] + [f"{r['task']} ({r['system_a']} vs {r['system_b']}): {r['unpaired_a']} question(s) of A and "
                         f"{r['unpaired_b']} of B had no partner and were left out" for r in unpaired]
    return "\n".join(lines)


def _p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"
