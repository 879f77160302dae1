"""What the report shows, gathered from a run's artifacts alone (its config.yaml, tasks.json and
the manifests of the units its plan wants) into one JSON-able dict: report.json."""
from __future__ import annotations

import json
from pathlib import Path

from modecotd.config import CONTROLS, GENERATING_BACKENDS, WEIGHT_CONTROLS
from modecotd.config_loading import read_yaml
from modecotd.evaluate import majority_baseline
from modecotd.plan import ALONE, MIXTURES, SYSTEMS, RunLayout
from modecotd.units import EvaluationFiles, MixtureFiles, TrainingFiles
from modecotd.run_view import RunView
from modecotd.stats import majority_answer_accuracy, mean_over_seeds_and_tasks_ci, wilson_interval
from modecotd.storage import Storage
from modecotd.tasks.schema import Role, TaskData

WORST_PAIRS = 10  # (task, system) pairs whose errors the report samples
ERRORS_PER_PAIR = 3


def as_storage(run: "Storage | str | Path") -> Storage:
    return run if isinstance(run, Storage) else Storage(run)


def task_facts(tasks: dict[str, TaskData]) -> dict[str, dict]:
    """What the report needs to know of each task's data (kept in the run folder as tasks.json, so
    that the report can be rebuilt from the run folder alone)."""
    return {name: {"role": data.role.value, "kind": data.kind.value,
                   "sizes": {"train": len(data.train), "fewshot": len(data.fewshot), "test": len(data.test)},
                   "majority": majority_baseline([e.answer for e in data.train or data.fewshot],
                                                 [e.answer for e in data.test]),
                   "unparsed": data.unparsed}
            for name, data in tasks.items()}


def collect(run: "Storage | str | Path") -> dict:
    """Everything the report shows, as one JSON-able dict, from the run's artifacts (a folder or a
    URI): its config.yaml, tasks.json and the manifests of the units its plan wants (see
    :class:`RunView`)."""
    storage = as_storage(run)
    view = RunView(storage)
    layout = view.layout
    for needed in (layout.config, layout.tasks):
        if not storage.exists(needed):
            raise FileNotFoundError(f"{storage.describe()}: no {needed}; is this a modecotd run?")
    config = read_yaml(storage.read_text(layout.config), f"{storage.describe()}/{layout.config}")
    teacher = config["teacher"]
    generates = teacher["backend"] in GENERATING_BACKENDS
    out: dict = {"run": config["name"], "run_dir": storage.describe(),
                 "teacher": {"backend": teacher["backend"], "model": teacher["model"] if generates else None,
                             "prompting": teacher["prompting"] if generates else None,
                             "prompt_format": teacher.get("prompt_format", "raw") if generates else None},
                 "student": config["student"], "scoring": config["evaluation"]["scoring"], "tasks": {},
                 "sampled": {t["name"]: t["sizes"]["sample_seed"] for t in config["tasks"]
                             if t.get("sizes", {}).get("sample_seed") is not None}}
    facts = json.loads(storage.read_text(layout.tasks))
    errors: list[dict] = []  # one entry per evaluated (task, system) pair with its rows (the first seed's)
    scores: dict[tuple[str, str], dict] = {}  # (task, system) -> {seed: its per-question rows}
    seeds = config.get("seeds") or [config.get("seed", 0)]
    layouts = {seed: layout if index == 0 else layout.for_seed(seed) for index, seed in enumerate(seeds)}
    out["seeds"] = seeds
    seen = [task["name"] for task in config["tasks"] if task["role"] == Role.SEEN.value]
    for name in (task["name"] for task in config["tasks"]):  # in the config's order
        entry: dict = dict(facts[name])
        teacher = view.manifest(layout.rationales(name))
        if teacher:
            entry["teacher"] = teacher["summary"]
        expert = view.manifest(layout.expert(name))
        if expert:
            entry["expert"] = expert["summary"] | {"seconds": expert.get("seconds")}
        # the systems the run planned for the task (a run from before plans named them: every possible one)
        mixtures = view.planned_systems(name, "mix")
        entry["mixtures"] = {system: manifest["summary"] for system in MIXTURES + WEIGHT_CONTROLS
                             if (mixtures is None or system in mixtures)
                             and (manifest := view.manifest(layout.mixture(name, system)))}
        entry["eval"], entry["majority_test"] = {}, {"answer": None, "accuracy": None}
        alone = [] if name in seen else [f"{ALONE}{expert}" for expert in seen]  # each expert on its own
        planned = view.planned_systems(name)
        for system in SYSTEMS + tuple(alone) if planned is None else planned:
            found = _evaluation(view, layouts, name, system, out["scoring"])
            if found:
                entry["eval"][system], scores[(name, system)], entry["majority_test"], error = found
                errors.append(error)
        out["tasks"][name] = entry
    out["worst"] = worst_pairs(errors)
    out["seconds"] = json.loads(storage.read_text(layout.timings)) if storage.exists(layout.timings) else {}
    out["precision"] = precisions_used(out["tasks"])
    out["resources"] = stage_resources(config)
    out["means"], out["changes"] = means_with_intervals(out["tasks"], scores, out["scoring"])
    out["readings"] = {}  # the same means and changes under every reading of the answers
    for reading in READINGS:
        means, changes = means_with_intervals(out["tasks"], scores, reading)
        if means:
            out["readings"][reading] = {"means": means, "changes": changes}
    return out


def _evaluation(view: RunView, layouts: dict, task: str, system: str, scoring: str):
    """``system`` on ``task`` over every seed it was evaluated with: (its summary over the seeds,
    {seed: rows}, the test set's majority answer, its error entry from the first seed's rows); None
    when it was not evaluated."""
    by_seed = {seed: (summary, rows) for seed, where in layouts.items()
               if (summary := view.manifest(where.evaluation(task, system)))
               and (rows := eval_rows(view, task, system, where)) is not None}
    if not by_seed:
        return None
    first_seed = next(iter(by_seed))
    first_summary, rows = by_seed[first_seed]
    summary = seeds_summary({seed: m["summary"] for seed, (m, _) in by_seed.items()},
                            {seed: r for seed, (_, r) in by_seed.items()}, scoring)
    answer, accuracy = majority_answer_accuracy([r["gold"] for r in rows])
    error = _error_entry(task, system, with_interval(first_summary["summary"]), rows, scoring,
                         f"{layouts[first_seed].evaluation(task, system)}/{EvaluationFiles.ROWS}")
    return summary, {seed: r for seed, (_, r) in by_seed.items()}, {"answer": answer, "accuracy": accuracy}, error


def eval_rows(view: RunView, task: str, system: str, layout: RunLayout | None = None) -> list[dict] | None:
    """The per-question rows of a current evaluation of ``system`` on ``task`` (of the seed whose
    ``layout`` is given, default the run's first); None when there is none (not evaluated, not
    committed, not what the run's plan wants, or its rows file is missing)."""
    text = view.read((layout or view.layout).evaluation(task, system), EvaluationFiles.ROWS)
    return None if text is None else [json.loads(line) for line in text.splitlines() if line.strip()]


def pair_rows(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[tuple[dict, dict]], str]:
    """Rows of A and B on the same question, in A's order, and the field that paired them ("id" when
    every row has one, else "question"). A question asked twice pairs occurrence by occurrence."""
    key = "id" if all("id" in r for r in rows_a + rows_b) else "question"
    keyed_b = _by_key(rows_b, key)
    return [(row, keyed_b[k]) for k, row in _by_key(rows_a, key).items() if k in keyed_b], key


def _by_key(rows: list[dict], key: str) -> dict[tuple, dict]:
    seen: dict = {}
    keyed = {}
    for row in rows:
        value = row.get(key)
        seen[value] = seen.get(value, 0) + 1
        keyed[(value, seen[value])] = row
    return keyed


READINGS = ("strict", "reference", "likelihood")  # the ways an answer is scored (likelihood: choice and yes/no)


def correct_field(scoring: str) -> str:
    """The row field that says whether a prediction is right under ``scoring`` (a reading)."""
    return {"strict": "correct", "reference": "correct_reference", "likelihood": "correct_likelihood"}[scoring]


def seeds_summary(summaries: dict, rows: dict, scoring: str) -> dict:
    """One (task, system) pair's summary over the seeds it was evaluated with: with one seed its
    own, with the Wilson interval; with several, the mean of each score over the seeds, each seed's
    accuracy (``by_seed``) and an interval from a bootstrap over seeds and questions."""
    if len(summaries) == 1:
        return with_interval(next(iter(summaries.values())))
    field = correct_field(scoring)
    averaged = {}
    for key in ("accuracy", "accuracy_strict", "accuracy_reference", "accuracy_likelihood", "format_rate",
                "partial_credit"):
        values = [m[key] for m in summaries.values() if m.get(key) is not None]
        averaged[key] = sum(values) / len(values) if values else None
    _, low, high = mean_over_seeds_and_tasks_ci([[[bool(r.get(field)) for r in seed_rows]] for seed_rows in rows.values()])
    first = next(iter(summaries.values()))
    return {**averaged, "n": first.get("n"), "precision": first.get("precision"), "ci_low": low, "ci_high": high,
            "by_seed": {str(seed): m.get("accuracy") for seed, m in summaries.items()}}


def with_interval(summary: dict) -> dict:
    """An evaluation summary with the 95% Wilson interval of its accuracy (ci_low, ci_high)."""
    n, accuracy = summary.get("n"), summary.get("accuracy")
    if not n or accuracy is None:
        return dict(summary)
    low, high = wilson_interval(round(accuracy * n), n)
    return {**summary, "ci_low": low, "ci_high": high}


def _error_entry(task: str, system: str, summary: dict, rows: list[dict], scoring: str, rows_file: str) -> dict:
    """A (task, system) pair's accuracy with its first few wrong predictions, shortened."""
    field = correct_field(scoring)
    wrong = [r for r in rows if not r.get(field)][:ERRORS_PER_PAIR]
    return {"task": task, "system": system, "n": summary.get("n"), "accuracy": summary.get("accuracy"),
            "ci_low": summary.get("ci_low"), "ci_high": summary.get("ci_high"),
            "rows_file": rows_file,
            "errors": [{"question": _shorten(r.get("question", ""), 160), "gold": r.get("gold"),
                        "extracted": r.get("extracted"), "output_tail": _tail(r.get("output") or "", 160)}
                       for r in wrong]}


def worst_pairs(entries: list[dict], limit: int = WORST_PAIRS) -> list[dict]:
    """The ``limit`` pairs of lowest accuracy that have errors to show (ties keep the report's order)."""
    wrong = [e for e in entries if e["accuracy"] is not None and e["errors"]]
    return sorted(wrong, key=lambda e: e["accuracy"])[:limit]


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _tail(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def stage_resources(config: dict) -> dict[str, str]:
    """Each stage's resources as the config declares them, in words."""
    def each(cpus, gpus) -> str:
        return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")

    teacher, distill, mixture, evaluation = (config[k] for k in ("teacher", "distill", "mixture", "evaluation"))
    return {
        "teacher": f"{teacher['actors']} actors x {each(teacher['cpus_per_actor'], teacher['gpus_per_actor'])}",
        "distill": (f"up to {distill['max_concurrent_jobs']} jobs x {distill['workers_per_job']} workers x "
                    f"{each(distill['cpus_per_worker'], distill['gpus_per_worker'] if distill['use_gpu'] else 0)}"),
        "mix": (f"up to {mixture['max_concurrent_trials']} trials x "
                f"{each(mixture['cpus_per_trial'], mixture['gpus_per_trial'])}"),
        "evaluate": f"{evaluation['actors']} actors x {each(evaluation['cpus_per_actor'], evaluation['gpus_per_actor'])}",
    }


PAPER_CHANGES = {"seen": 6.3, "unseen": 7.8}  # the paper's abstract: points of mean accuracy, Flan-T5-XL, full data
# What each mixture is measured against: the paper's baselines, then the controls that use the same few-shot rows
CHANGE_REFERENCES = {"seen": ("expert", "multitask", *CONTROLS), "unseen": ("base", "multitask", *CONTROLS)}


def means_with_intervals(tasks: dict, scores: dict[tuple[str, str], dict], scoring: str) -> tuple[dict, list[dict]]:
    """Mean accuracy per role and system over the tasks it was evaluated on, and each mixture's
    change over the per-task experts and the multi-task LoRA (seen tasks) or over the base student
    and the multi-task LoRA (unseen), then over each control, on the tasks both were evaluated on,
    question by question within each seed. ``scores[(task, system)]``: {seed: rows}; a system
    evaluated once for every seed (the base student) pairs with each seed's. Each with a 95%
    bootstrap interval over the seeds and the questions within each task and seed
    (:func:`~modecotd.stats.mean_over_seeds_and_tasks_ci`)."""
    field = correct_field(scoring)
    scores = {pair: by_seed for pair, by_seed in scores.items()  # the rows this reading can score
              if by_seed and all(rows and all(field in r for r in rows) for rows in by_seed.values())}
    means: dict = {}
    changes: list[dict] = []
    for role in (Role.SEEN.value, Role.UNSEEN.value):
        names = [name for name, entry in tasks.items() if entry["role"] == role]
        for system in SYSTEMS:
            covered = [name for name in names if (name, system) in scores]
            seeds = _common_seeds([scores[(name, system)] for name in covered])
            if covered and seeds:
                mean, low, high = mean_over_seeds_and_tasks_ci(
                    [[[bool(r.get(field)) for r in scores[(name, system)][seed]] for name in covered] for seed in seeds])
                means.setdefault(role, {})[system] = {"mean": mean, "ci_low": low, "ci_high": high,
                                                      "tasks": len(covered), "seeds": len(seeds)}
        majority = [tasks[name]["majority"]["accuracy"] for name in names
                    if tasks[name]["majority"]["accuracy"] is not None and any((name, s) in scores for s in SYSTEMS)]
        if majority:
            means.setdefault(role, {})["majority"] = {"mean": sum(majority) / len(majority), "tasks": len(majority)}
        for mixture in MIXTURES:
            for reference in CHANGE_REFERENCES[role]:
                both = [name for name in names if (name, mixture) in scores and (name, reference) in scores]
                mixed = {name: scores[(name, mixture)] for name in both}
                seeds = _common_seeds(list(mixed.values()))
                differences = [[_differences(scores[(name, reference)], mixed[name], seed, field) for name in both]
                               for seed in seeds]
                if both and seeds and all(all(task) for task in differences):
                    change, low, high = mean_over_seeds_and_tasks_ci(differences)
                    changes.append({"role": role, "mixture": mixture, "over": reference, "tasks": len(both),
                                    "seeds": len(seeds), "change": change, "ci_low": low, "ci_high": high,
                                    "paper": PAPER_CHANGES[role]})
    return means, changes


def _common_seeds(by_seed: list[dict]) -> list:
    """The seeds every one of these (task, system) pairs was evaluated with."""
    if not by_seed:
        return []
    return [seed for seed in by_seed[0] if all(seed in pair for pair in by_seed)]


def _differences(reference: dict, mixture: dict, seed, field: str) -> list[int]:
    """Question by question, the mixture's correctness minus the reference's, within one seed (a
    reference evaluated once, as the base student, serves every seed)."""
    rows = reference.get(seed) or (next(iter(reference.values())) if len(reference) == 1 else None)
    if rows is None:
        return []
    pairs, _ = pair_rows(rows, mixture[seed])
    return [int(bool(m.get(field))) - int(bool(r.get(field))) for r, m in pairs]


def training_curves(run: "Storage | str | Path") -> dict[str, dict]:
    """Each current expert's loss per micro-batch and validation losses, from its training.json."""
    view = RunView(as_storage(run))
    curves = {}
    for prefix in view.units_under(view.layout.expert("")):
        text = view.read(prefix, TrainingFiles.SUMMARY)
        if text is None:
            continue
        summary = json.loads(text)
        curves[prefix.rsplit("/", 1)[1]] = {"losses": summary.get("losses", []),
                                            "accumulation": summary.get("gradient_accumulation", 1),
                                            "validation": summary.get("validation_losses", [])}
    return curves


def search_curves(run: "Storage | str | Path") -> dict[str, list[float]]:
    """Best objective so far per evaluation of the chosen setting's final search, per target task
    (of each current mixture)."""
    view = RunView(as_storage(run))
    curves = {}
    for prefix in view.units_under(view.layout.mixture("")):
        mixture, search = view.read(prefix, MixtureFiles.SUMMARY), view.read(prefix, MixtureFiles.SEARCH)
        if mixture is None or search is None:
            continue
        mixture = json.loads(mixture)
        if mixture.get("control"):  # a fixed-weight control searched nothing
            continue
        trial = next((t for t in json.loads(search)["trials"] if t.get("setting") == mixture.get("setting")), None)
        if trial and trial["history"]:
            best, curve = float("inf"), []
            for h in trial["history"]:
                best = min(best, h["objective"])
                curve.append(best)
            curves[prefix.rsplit("/", 1)[1]] = curve
    return curves


def precisions_used(tasks: dict) -> list[str]:
    """Which dtype each stage computed in and why, as the workers recorded it (one line per
    distinct choice: nodes of a cluster may differ)."""
    seen: dict[str, set[str]] = {}
    for entry in tasks.values():
        found = [("distill", entry.get("expert", {}).get("precision"))]
        found += [("mix", mixture.get("precision")) for mixture in entry.get("mixtures", {}).values()]
        found += [("evaluate", result.get("precision")) for result in entry.get("eval", {}).values()]
        for stage, precision in found:
            if precision:
                seen.setdefault(stage, set()).add(f"{precision['dtype']} ({precision['requested']}: "
                                                  f"{precision['reason']})")
    return [f"{stage}: {'; '.join(sorted(choices))}" for stage, choices in seen.items()]


def systems_in(report: dict) -> list[str]:
    """The systems evaluated on at least one task, in the standard order."""
    return [s for s in SYSTEMS if any(s in t["eval"] for t in report["tasks"].values())] or ["base"]
