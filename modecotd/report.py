"""The run report, rebuilt from the artifacts alone: report.md, report.json, PNG plots."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


from modecotd.artifacts import write_json
from modecotd.config import CONTROLS, GENERATING_BACKENDS, MIXER_METHODS, MIXTURE, STAGES, WEIGHT_CONTROLS, \
    mixture_system, read_yaml
from modecotd.evaluate import majority_baseline
from modecotd.plan import ALONE, RunLayout
from modecotd.run_view import RunView
from modecotd.stats import majority_answer_accuracy, mean_over_seeds_and_tasks_ci, wilson_interval
from modecotd.storage import Storage
from modecotd.tasks.schema import Role, TaskData

MIXTURES = (MIXTURE, *map(mixture_system, MIXER_METHODS))  # one, or one per method
SYSTEMS = ("base", "expert", *MIXTURES, "multitask", *CONTROLS, "full_finetune")
ROWS_FILE = "predictions.jsonl"  # an evaluation unit's per-question rows (modecotd.evaluate.score_rows)
WORST_PAIRS = 10  # (task, system) pairs whose errors the report samples
ERRORS_PER_PAIR = 3


def _storage(run: "Storage | str | Path") -> Storage:
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
    storage = _storage(run)
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
        entry["mixtures"] = {system: manifest["summary"] for system in MIXTURES + WEIGHT_CONTROLS
                             if (manifest := view.manifest(layout.mixture(name, system)))}
        entry["eval"], entry["majority_test"] = {}, {"answer": None, "accuracy": None}
        alone = [] if name in seen else [f"{ALONE}{expert}" for expert in seen]  # each expert on its own
        for system in SYSTEMS + tuple(alone):
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
                         f"{layouts[first_seed].evaluation(task, system)}/{ROWS_FILE}")
    return summary, {seed: r for seed, (_, r) in by_seed.items()}, {"answer": answer, "accuracy": accuracy}, error


def eval_rows(view: RunView, task: str, system: str, layout: RunLayout | None = None) -> list[dict] | None:
    """The per-question rows of a current evaluation of ``system`` on ``task`` (of the seed whose
    ``layout`` is given, default the run's first); None when there is none (not evaluated, not
    committed, not what the run's plan wants, or its rows file is missing)."""
    text = view.read((layout or view.layout).evaluation(task, system), ROWS_FILE)
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


def means_section(report: dict) -> list[str]:
    """The means per role and system, then each mixture's change beside the paper's."""
    if not report.get("means"):
        return []
    seeded = len(report.get("seeds") or []) > 1
    lines = ["", "## Means over tasks", "",
             "Mean over the tasks of each role of the per-task accuracy (each task weighs the same), in %, with a "
             "95% interval from a bootstrap that resamples questions within each task" +
             (" and the training seeds (a system trained with several seeds: the mean over its seeds; the interval "
              "covers their spread)." if seeded else "."), "",
             "| role | system | tasks | mean accuracy |", "|---|---|---|---|"]
    for role, by_system in report["means"].items():
        lines += [f"| {role} | {system} | {m['tasks']} | {_with_ci({'accuracy': m['mean'], **m})} |"
                  for system, m in by_system.items()]
    if report.get("changes"):
        changes = report["changes"]
        lines += ["", f"Each mixture's change in points of mean accuracy over each reference, question by question "
                  f"on the tasks both systems were evaluated on, with its 95% bootstrap interval: {len(changes)} "
                  "comparisons, so by chance alone about one in twenty intervals excludes 0; none is a finding by "
                  f"itself. The paper's abstract reports +{PAPER_CHANGES['seen']} (seen) and "
                  f"+{PAPER_CHANGES['unseen']} (unseen) points of mean accuracy for Flan-T5-XL trained on the full "
                  "data, without naming the baseline: no row here is that comparison.", "",
                  "| role | mixture | over | tasks | change (points) |", "|---|---|---|---|---|"]
        lines += [f"| {c['role']} | {c['mixture']} | {c['over']} | {c['tasks']} | {100 * c['change']:+.1f} "
                  f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] |" for c in changes]
    return lines


def seeds_section(report: dict) -> list[str]:
    """Each seed's accuracy of every (task, system) pair trained with several seeds, beside their
    mean and its interval over seeds and questions."""
    seeds = [str(seed) for seed in report.get("seeds") or []]
    pairs = [(name, system, ev) for name, t in report["tasks"].items() for system, ev in t["eval"].items()
             if ev.get("by_seed")]
    if len(seeds) < 2 or not pairs:
        return []
    lines = ["", "## Seeds", "",
             f"The distill and mix stages ran once per seed ({', '.join(seeds)}); the teacher's rationales and the "
             "base student are the same for every seed. Accuracy in % per seed; mean over the seeds with a 95% "
             "interval from a bootstrap over seeds and questions. One interval among many comparisons is not a "
             "finding by itself.", "",
             "| task | system | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean [95% CI] |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    lines += [f"| {name} | {system} | " + " | ".join(_pct(ev["by_seed"].get(seed)) for seed in seeds) +
              f" | {_with_ci(ev)} |" for name, system, ev in pairs]
    return lines


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _with_ci(summary: dict) -> str:
    """An accuracy in % with its 95% interval, e.g. "50.0 [23.7, 76.3]"."""
    text = _pct(summary.get("accuracy"))
    if summary.get("ci_low") is None:
        return text
    return f"{text} [{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]"


def _code(text) -> str:
    """Inline code that survives any text (no backticks, no line breaks); None is a dash."""
    if text is None:
        return "–"
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def worst_section(worst: list[dict]) -> list[str]:
    """The lowest-accuracy (task, system) pairs, each with a few wrong predictions and its rows file."""
    if not worst:
        return []
    lines = ["", f"## Sample errors of the {len(worst)} lowest-accuracy (task, system) pairs", "",
             f"Up to {ERRORS_PER_PAIR} wrong predictions each (question shortened, end of the output); "
             "every row is in the linked file.", ""]
    for rank, pair in enumerate(worst, 1):
        lines += [f"### {rank}. {pair['task']} / {pair['system']}: {_with_ci(pair)} (n {pair['n']})", "",
                  f"Rows: [{pair['rows_file']}]({pair['rows_file']})", ""]
        lines += [f"- Q: {_code(e['question'])} gold {_code(e['gold'])}, extracted {_code(e['extracted'])}; "
                  f"output ends {_code(e['output_tail'])}" for e in pair["errors"]]
        lines.append("")
    return lines[:-1]


def systems_in(report: dict) -> list[str]:
    """The systems evaluated on at least one task, in the standard order."""
    return [s for s in SYSTEMS if any(s in t["eval"] for t in report["tasks"].values())] or ["base"]


def render_markdown(report: dict) -> str:
    sections = (header_section, accuracy_section, unseen_section, findings_section, partial_credit_section,
                means_section, seeds_section, lambda r: worst_section(r.get("worst", [])), teacher_section,
                experts_section, mixtures_section, orders_section, mixture_plots_section, wall_time_section,
                scoring_section, unparsed_section)
    lines = [line for section in sections for line in section(report)]
    lines += ["", "![accuracy by task and system](accuracy.png)", ""]
    return "\n".join(lines)


def header_section(report: dict) -> list[str]:
    """The run, its teacher and student, the precision, the sampled rows, scoring and decoding."""
    teacher, student = report["teacher"], report["student"]
    teacher_text = teacher["backend"] + (f" ({teacher['model']}, {teacher.get('prompting')} CoT, prompt format "
                                         f"{teacher.get('prompt_format') or 'raw'})" if teacher["model"] else "")
    sampled = report.get("sampled")
    return [
        f"# modecotd run `{report['run']}`",
        "",
        f"- Teacher: {teacher_text}",
        f"- Student (frozen): {student['model']} (dtype {student['dtype']}; prompt format "
        f"{student.get('prompt_format', 'raw')}: "
        + ("its tokenizer's chat template, the paper's prompt as the user's turn)"
           if student.get('prompt_format') == "chat" else "the paper's plain text prompt)"),
        *[f"- Computed in {use}" for use in report.get("precision", [])],
        *(["- Rows drawn at random from the data files (seed per task): "
           + ", ".join(f"{name} {seed}" for name, seed in sampled.items())] if sampled else []),
        f"- Scoring: {report['scoring']} (accuracy in %, exact match after answer normalisation); the "
        f"other scoring is in the last section",
        "- Decoding: greedy for every system (the authors sampled their baselines' outputs; our baselines "
        "are decoded like the mixture)",
    ]


def accuracy_section(report: dict) -> list[str]:
    """Every system's accuracy (with its interval) and answer format on every task, beside the
    constant guessers."""
    systems = systems_in(report)
    lines = [
        "",
        "## Accuracy by task and system",
        "",
        "Accuracy in %, with its 95% Wilson interval in brackets. majority: always giving the train split's "
        "most common answer. test majority: always giving the test set's most common gold answer, an upper "
        "bound for any constant guesser (it reads the test golds).",
        "",
        "| task | role | n test | majority | test majority | " + " | ".join(systems) + " | "
        + " | ".join(f"{system} format" for system in systems) + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(systems)),
    ]
    for name, t in report["tasks"].items():
        ev = t["eval"]
        lines.append("| " + " | ".join([
            name, t["role"], str(t["sizes"]["test"]), _pct(t["majority"]["accuracy"]),
            _pct(t.get("majority_test", {}).get("accuracy")),
            *(_with_ci(ev.get(s, {})) for s in systems),
            *(_pct(ev.get(s, {}).get("format_rate")) for s in systems)]) + " |")
    return lines


def findings_section(report: dict) -> list[str]:
    return ["", "## What came out", ""] + findings(report)


def partial_credit_section(report: dict) -> list[str]:
    """Free-text tasks: the share of answer characters each system got right."""
    partial = [(n, t) for n, t in report["tasks"].items()
               if any(ev.get("partial_credit") is not None for ev in t["eval"].values())]
    if not partial:
        return []
    return ["", "Partial credit (share of answer characters right, free-text tasks):", ""] + [
        f"- {name}: " + ", ".join(f"{s} {_pct(ev.get('partial_credit'))}" for s, ev in t["eval"].items())
        for name, t in partial]


def teacher_section(report: dict) -> list[str]:
    """What the teacher stage kept of each task's questions, and why it rejected the rest."""
    lines = ["", "## Teacher", "",
             "Yield: share of questions with at least one accepted rationale. Rationalized: accepted rows "
             "written with the gold answer as a hint (STaR). Failed: questions the teacher could not do. "
             "Samples: how many rationales came back of those asked (fewer when an endpoint failed part-way).", "",
             "| task | questions | yield | accepted | per answered question | mean words | rationalized "
             "| failed | samples | rejections | failures | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        if "teacher" in t:
            tt = t["teacher"]
            rejections = ", ".join(f"{k}: {v}" for k, v in tt["rejection_reasons"].items()) or "none"
            failures = ", ".join(f"{k}: {v}" for k, v in tt.get("failure_reasons", {}).items()) or "none"
            speed = tt.get("tokens_per_second")
            lines.append(" | ".join([
                f"| {name}", str(tt["questions"]), _pct(tt["yield"]), str(tt["accepted"]),
                f"{tt.get('rationales_per_answered_question', 0):.2f}", f"{tt.get('mean_rationale_words', 0):.1f}",
                str(tt.get("rationalized", 0)), str(tt.get("failed", 0)),
                f"{tt['samples_returned']} of {tt['samples_asked']}" if "samples_asked" in tt else "–",
                rejections, failures,
                "–" if not speed else f"{speed:.0f}"]) + " |")
    return lines


def experts_section(report: dict) -> list[str]:
    """Each expert's training: rows, steps, loss curve ends, early stop, resumption, time."""
    lines = ["", "## Experts", "",
             "| task | status | rows | steps | loss first → final | best validation loss | notes | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        if "expert" in t:
            e = t["expert"]
            best = e.get("best_validation_loss")
            notes = []
            if e.get("stopped_early"):
                notes.append(f"early stop at {e.get('steps')} of {e.get('planned_steps')} steps")
            if e.get("resumed_from_step") is not None:
                notes.append(f"resumed from step {e['resumed_from_step']}")
            lines.append(f"| {name} | {e.get('status')} | {e.get('examples')} | {e.get('steps')} | "
                         f"{e.get('first_loss', 0):.3f} → {e.get('final_loss', 0):.3f} | "
                         f"{'–' if best is None else f'{best:.3f}'} | {'; '.join(notes) or '–'} | "
                         f"{e.get('seconds') or 0:.0f} |")
    if any("expert" in t for t in report["tasks"].values()):
        lines += ["", "![training loss per expert](training.png)"]
    return lines


def mixtures_section(report: dict) -> list[str]:
    """The mixer setting kept for each target task and method, its losses and its weights."""
    lines = ["", "## Mixtures", "", "The setting with the lowest cross-validated few-shot loss, out of those Ray "
             "Tune tried for the task.", "",
             "| target | method | L1 | bound | budget | top-k | settings tried (finished) | CV loss | loss at w=0 | "
             "weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in report["tasks"].items():
        for system, m in t.get("mixtures", {}).items():
            weights = ", ".join(f"{k} {v:+.2f}" for k, v in m["weights"].items())
            zero = m.get("zero_weights_loss")
            label = name if system == MIXTURE else f"{name} ({system})"
            lines.append(f"| {label} | {m.get('method', 'lorahub')} | {m['l1']} | {m.get('bound', '–')} | "
                         f"{m.get('budget', '–')} | {m.get('top_k') or 'all'} | "
                         f"{m.get('settings_tried', '–')} ({len(m.get('candidates', []))}) | "
                         f"{_cv_text(m)} | {'–' if zero is None else f'{zero:.3f}'} | {weights} |")
    return lines


def mixture_plots_section(report: dict) -> list[str]:
    if not any(t.get("mixtures") for t in report["tasks"].values()):
        return []
    return ["", "![mixture weights, target task by expert](mixture_weights.png)",
            "", "![weight search: best objective per evaluation](search.png)"]


def wall_time_section(report: dict) -> list[str]:
    if not report["seconds"]:
        return []
    return ["", "## Wall time and resources", "", "| stage | wall time | resources asked for |", "|---|---|---|"] + [
        f"| {stage} | {report['seconds'][stage]:.0f} s | {report['resources'].get(stage, '–')} |"
        for stage in STAGES if stage in report["seconds"]]


def orders_section(report: dict) -> list[str]:
    """How much each searched mixture depends on the order its search saw the experts in: the expert
    with the largest weight in each order, how many orders agree with the kept one, and the range of
    that expert's weight over the orders."""
    searched = [(name, system, m) for name, t in report["tasks"].items()
                for system, m in t.get("mixtures", {}).items() if m.get("orders")]
    if not searched:
        return []
    lines = ["", "### Order of the experts", "",
             "Each weight search ran once per order of the experts (mixture.orders; 1 is the authors' setting, the "
             "config's task order, on which the paper's search depends); the order with the lowest few-shot "
             "objective was kept. Largest: the expert with the largest weight in each order, the kept order's "
             "first.", "",
             "| target | orders | largest, kept order | orders agreeing | its weight over the orders | largest per order |",
             "|---|---|---|---|---|---|"]
    for name, system, m in searched:
        kept = m["largest_by_order"][m["kept_order"]]
        low, high = m["weight_range"][kept]
        label = name if system == MIXTURE else f"{name} ({system})"
        lines.append(f"| {label} | {len(m['orders'])} | {kept} | {round(m['order_agreement'] * len(m['orders']))} of "
                     f"{len(m['orders'])} | {low:+.2f} to {high:+.2f} | {', '.join(m['largest_by_order'])} |")
    return lines


def unseen_section(report: dict) -> list[str]:
    """Each task no expert was trained on, system by system: the mixture beside the base student,
    each seen expert alone, the baselines and the majority answers, with 95% intervals."""
    lines = []
    for name, t in report["tasks"].items():
        if t["role"] != Role.UNSEEN.value or not t["eval"]:
            continue
        lines += ["", f"## Unseen task {name}", "",
                  f"{t['sizes']['test']} test questions ({t['kind']} answers); accuracy in % with its 95% Wilson "
                  "interval; format: share of outputs that wrote the answer marker; likelihood: the option the "
                  "system finds most probable after its reasoning (no answer format needed).", "",
                  "| system | accuracy | format | likelihood | partial credit | vs base (points) |",
                  "|---|---|---|---|---|---|"]
        base = t["eval"].get("base", {}).get("accuracy")
        for system, ev in t["eval"].items():
            gain = "–" if base is None or ev.get("accuracy") is None else f"{100 * (ev['accuracy'] - base):+.1f}"
            lines.append(f"| {system} | {_with_ci(ev)} | {_pct(ev.get('format_rate'))} | "
                         f"{_pct(ev.get('accuracy_likelihood'))} | {_pct(ev.get('partial_credit'))} | {gain} |")
        for label, majority in (("majority (train answers)", t["majority"]),
                                ("majority (test answers)", t.get("majority_test", {}))):
            if majority.get("accuracy") is not None:
                lines.append(f"| {label}: always {_code(majority.get('answer'))} | {_pct(majority['accuracy'])} "
                             "| – | – | – | – |")
    return lines


def scoring_section(report: dict) -> list[str]:
    """Every accuracy under the three readings: strict (ours), reference (the authors' evaluate.py)
    and likelihood (yes/no and choice tasks), then the means and changes under each."""
    pairs = [(name, system, ev) for name, t in report["tasks"].items() for system, ev in t["eval"].items()
             if ev.get("accuracy_reference") is not None]
    if not pairs:
        return []
    lines = ["", "## Three readings of the answers", "",
             "strict: the answer after the marker, normalised, must equal the gold. reference: the authors' "
             "rule (the gold as a substring of what follows the last marker, with their fallbacks), which "
             "counts some wrong answers as right. likelihood (yes/no and multiple-choice tasks): the option the "
             "system finds most probable after its own reasoning and the marker, which needs no answer format.",
             "", "| task | system | strict | reference | likelihood |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {system} | {_pct(ev.get('accuracy_strict'))} | {_pct(ev.get('accuracy_reference'))} | "
              f"{_pct(ev.get('accuracy_likelihood'))} |" for name, system, ev in pairs]
    readings = report.get("readings", {})
    if readings:
        lines += ["", "Mean accuracy per role and system under each reading (the tasks each reading covers), in %, "
                  "with its bootstrap 95% interval:", "", "| role | system | " + " | ".join(readings) + " |",
                  "|---|---|" + "---|" * len(readings)]
        rows = dict.fromkeys((role, system) for r in readings.values() for role, by in r["means"].items() for system in by)
        for role, system in rows:
            cells = [readings[r]["means"].get(role, {}).get(system) for r in readings]
            lines.append(f"| {role} | {system} | " + " | ".join(
                "–" if m is None else f"{_with_ci({'accuracy': m['mean'], **m})} ({m['tasks']})" for m in cells) + " |")
        changes = [(r, c) for r, found in readings.items() for c in found["changes"]]
        if changes:
            lines += ["", "Each mixture's change under each reading, in points, with its 95% interval:", "",
                      "| reading | role | mixture | over | tasks | change |", "|---|---|---|---|---|---|"]
            lines += [f"| {r} | {c['role']} | {c['mixture']} | {c['over']} | {c['tasks']} | {100 * c['change']:+.1f} "
                      f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}] |" for r, c in changes]
    return lines


def unparsed_section(report: dict) -> list[str]:
    """Rows of the data files the loader could not parse, by task, split and reason."""
    found = [(name, split, reasons) for name, t in report["tasks"].items()
             for split, reasons in (t.get("unparsed") or {}).items()]
    if not found:
        return []
    lines = ["", "## Rows that could not be read", ""]
    lines += [f"- {name} {split}: " + ", ".join(f"{reason} {count}" for reason, count in reasons.items())
              for name, split, reasons in found]
    return lines


def findings(report: dict) -> list[str]:
    """Plain sentences comparing each system with the base student and the majority answer."""
    out = []
    for name, t in report["tasks"].items():
        ev, majority = t["eval"], t["majority"]["accuracy"]
        base = ev.get("base", {}).get("accuracy")
        if base is None:
            continue
        parts = [f"base {_pct(base)}%"]
        for system in SYSTEMS[1:]:
            value = ev.get(system, {}).get("accuracy")
            if value is not None:
                parts.append(f"{system} {_pct(value)}% ({100 * (value - base):+.1f} points over base)")
        verdict = ""
        best = max(ev.get(s, {}).get("accuracy") or 0.0 for s in ("expert", *MIXTURES))
        if majority is not None:
            verdict = (" – above the majority answer" if best > majority else
                       " – not above always giving the majority answer") + f" ({_pct(majority)}%)"
        out.append(f"- {name} ({t['role']}): " + ", ".join(parts) + verdict + ".")
        out.extend(_limits(name, t, report["tasks"]))
    return out


def _limits(name: str, task: dict, tasks: dict) -> list[str]:
    """Say why a mixture never answered, when the data shows the reason."""
    mixture = next((task["eval"][s] for s in MIXTURES if s in task["eval"]), None)
    if task["role"] != Role.UNSEEN.value or not mixture or mixture.get("format_rate", 0) > 0:
        return []
    seen_kinds = sorted({t["kind"] for t in tasks.values() if t["role"] == Role.SEEN.value})
    if task["kind"] in seen_kinds:
        return [f"  - The mixture never wrote the answer format on {name}, although a seen task shares its "
                f"answer kind ({task['kind']})."]
    return [f"  - Limit: no seen expert answers in this task's answer kind ({task['kind']}; seen: "
            f"{', '.join(seen_kinds)}), and the mixture only re-weights experts, so it never wrote an answer "
            f"after the marker (format {_pct(mixture.get('format_rate'))}%)."]


def _pyplot():
    """matplotlib's pyplot drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(report: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(report["tasks"])
    systems = ["majority", *systems_in(report)]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    for i, system in enumerate(systems):
        values = []
        for name in names:
            t = report["tasks"][name]
            value = t["majority"]["accuracy"] if system == "majority" else t["eval"].get(system, {}).get("accuracy")
            values.append(100 * value if value is not None else 0.0)
        ax.bar([x + i * width for x in range(len(names))], values, width, label=system)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))])
    ax.set_xticklabels([f"{n}\n({report['tasks'][n]['role']})" for n in names], fontsize=8)
    ax.set_ylabel(f"accuracy (%, {report['scoring']})")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"run {report['run']}: accuracy by task and system")
    _save(fig, path)


def training_curves(run: "Storage | str | Path") -> dict[str, dict]:
    """Each current expert's loss per micro-batch and validation losses, from its training.json."""
    view = RunView(_storage(run))
    curves = {}
    for prefix in view.units_under(view.layout.expert("")):
        text = view.read(prefix, "training.json")
        if text is None:
            continue
        summary = json.loads(text)
        curves[prefix.rsplit("/", 1)[1]] = {"losses": summary.get("losses", []),
                                            "accumulation": summary.get("gradient_accumulation", 1),
                                            "validation": summary.get("validation_losses", [])}
    return curves


def plot_training(curves: dict[str, dict], path: Path) -> None:
    """Training loss per optimizer step (and validation loss where there is one) for every expert."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        n = curve["accumulation"]
        losses = curve["losses"]
        steps = [sum(losses[i:i + n]) / len(losses[i:i + n]) for i in range(0, len(losses), n)]
        (line,) = ax.plot(range(1, len(steps) + 1), steps, label=f"{name} train", linewidth=1)
        if curve["validation"]:
            xs, ys = zip(*curve["validation"])
            ax.plot(xs, ys, "o--", color=line.get_color(), label=f"{name} validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("expert training")
    _save(fig, path)


def plot_mixture_weights(report: dict, path: Path) -> None:
    """A heat map of the chosen weights: one row per target task, one column per expert."""
    plt = _pyplot()
    mixed = {(name if system == MIXTURE else f"{name} {system.removeprefix(MIXTURE + '-')}", name): m["weights"]
             for name, t in report["tasks"].items() for system, m in t.get("mixtures", {}).items() if m["weights"]}
    experts = sorted({e for weights in mixed.values() for e in weights})
    grid = [[weights.get(e, 0.0) for e in experts] for weights in mixed.values()]
    limit = max([abs(v) for row in grid for v in row] + [1e-9])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(experts), 1.2 + 0.5 * len(mixed)))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(experts)), experts, fontsize=8, rotation=20)
    ax.set_yticks(range(len(mixed)), [f"{label} ({report['tasks'][n]['role']})" for label, n in mixed], fontsize=8)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax)
    ax.set_title("mixture weights")
    _save(fig, path)


def search_curves(run: "Storage | str | Path") -> dict[str, list[float]]:
    """Best objective so far per evaluation of the chosen setting's final search, per target task
    (of each current mixture)."""
    view = RunView(_storage(run))
    curves = {}
    for prefix in view.units_under(view.layout.mixture("")):
        mixture, search = view.read(prefix, "mixture.json"), view.read(prefix, "search.json")
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


def plot_search(curves: dict[str, list[float]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1.2)
    ax.set_xlabel("objective evaluation")
    ax.set_ylabel("best objective so far (few-shot loss + L1)")
    ax.legend(fontsize=8)
    ax.set_title("mixture weight search")
    _save(fig, path)


def build_report(run: "Storage | str | Path") -> str:
    """Write report.json, report.md, report.html and the plots (accuracy, training curves, mixture
    weights, search curves) into the run's storage, from its artifacts alone; returns where
    report.md is (a path for a local folder)."""
    storage = _storage(run)
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


def write_html(markdown_text: str, path: Path) -> None:
    """report.md as one self-contained HTML page: the plots are embedded, nothing is fetched."""
    import base64
    import re

    import markdown

    def embed(match: re.Match) -> str:
        image = path.parent / match.group(2)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown_text),
                             extensions=["tables"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
    path.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>modecotd report</title>"
                    f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def _cv_text(mixture: dict) -> str:
    """The CV loss, or without cross-validation (a single setting) the fitted objective."""
    if mixture.get("cv_loss") is not None:
        return f"{mixture['cv_loss']:.3f}"
    objective = mixture.get("objective")
    return "– (no CV" + (f"; fit {objective:.3f})" if objective is not None else ")")


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
