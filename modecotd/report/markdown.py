"""report.md from report.json: one function per section, and the same page as self-contained HTML."""
from __future__ import annotations

from pathlib import Path

from modecotd.config import MIXTURE, STAGES
from modecotd.units import ReportFiles
from modecotd.report.collect import ERRORS_PER_PAIR, MIXTURES, PAPER_CHANGES, SYSTEMS, systems_in
from modecotd.tasks.schema import Role


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
    lines += [f"| {name} | {system} | " + " | ".join(percent(ev["by_seed"].get(seed)) for seed in seeds) +
              f" | {_with_ci(ev)} |" for name, system, ev in pairs]
    return lines


def percent(value) -> str:
    """A share in % with one decimal, – for none."""
    return "–" if value is None else f"{100 * value:.1f}"


def _with_ci(summary: dict) -> str:
    """An accuracy in % with its 95% interval, e.g. "50.0 [23.7, 76.3]"."""
    text = percent(summary.get("accuracy"))
    if summary.get("ci_low") is None:
        return text
    return f"{text} [{percent(summary['ci_low'])}, {percent(summary['ci_high'])}]"


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


def render_markdown(report: dict) -> str:
    sections = (header_section, accuracy_section, unseen_section, findings_section, partial_credit_section,
                means_section, seeds_section, lambda r: worst_section(r.get("worst", [])), teacher_section,
                experts_section, mixtures_section, orders_section, mixture_plots_section, wall_time_section,
                scoring_section, unparsed_section)
    lines = [line for section in sections for line in section(report)]
    lines += ["", f"![accuracy by task and system]({ReportFiles.ACCURACY_PLOT})", ""]
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
            name, t["role"], str(t["sizes"]["test"]), percent(t["majority"]["accuracy"]),
            percent(t.get("majority_test", {}).get("accuracy")),
            *(_with_ci(ev.get(s, {})) for s in systems),
            *(percent(ev.get(s, {}).get("format_rate")) for s in systems)]) + " |")
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
        f"- {name}: " + ", ".join(f"{s} {percent(ev.get('partial_credit'))}" for s, ev in t["eval"].items())
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
                f"| {name}", str(tt["questions"]), percent(tt["yield"]), str(tt["accepted"]),
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
        lines += ["", f"![training loss per expert]({ReportFiles.TRAINING_PLOT})"]
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
    return ["", f"![mixture weights, target task by expert]({ReportFiles.WEIGHTS_PLOT})",
            "", f"![weight search: best objective per evaluation]({ReportFiles.SEARCH_PLOT})"]


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
            lines.append(f"| {system} | {_with_ci(ev)} | {percent(ev.get('format_rate'))} | "
                         f"{percent(ev.get('accuracy_likelihood'))} | {percent(ev.get('partial_credit'))} | {gain} |")
        for label, majority in (("majority (train answers)", t["majority"]),
                                ("majority (test answers)", t.get("majority_test", {}))):
            if majority.get("accuracy") is not None:
                lines.append(f"| {label}: always {_code(majority.get('answer'))} | {percent(majority['accuracy'])} "
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
    lines += [f"| {name} | {system} | {percent(ev.get('accuracy_strict'))} | {percent(ev.get('accuracy_reference'))} | "
              f"{percent(ev.get('accuracy_likelihood'))} |" for name, system, ev in pairs]
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
        parts = [f"base {percent(base)}%"]
        for system in SYSTEMS[1:]:
            value = ev.get(system, {}).get("accuracy")
            if value is not None:
                parts.append(f"{system} {percent(value)}% ({100 * (value - base):+.1f} points over base)")
        verdict = ""
        best = max(ev.get(s, {}).get("accuracy") or 0.0 for s in ("expert", *MIXTURES))
        if majority is not None:
            verdict = (" – above the majority answer" if best > majority else
                       " – not above always giving the majority answer") + f" ({percent(majority)}%)"
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
            f"after the marker (format {percent(mixture.get('format_rate'))}%)."]


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

