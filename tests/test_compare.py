"""The report's intervals and error samples, and `modecotd compare`, on small fake runs written with
the pipeline's own layout (config.yaml, tasks.json, committed eval/<task>/<system>/ units)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modecotd.artifacts import Unit, write_jsonl
from modecotd.cli import main
from modecotd.config_loading import parse_config
from modecotd.evaluate import summarize
from modecotd.plan import PlannedUnit, RunLayout, plan_json
from modecotd.report import build_report, worst_pairs
from modecotd.stats import paired_bootstrap_diff_ci, wilson_interval
from modecotd.storage import Storage

QUESTIONS = [f"Question {i}: a coin is heads up; nobody flips it. Is it still heads up?" for i in range(10)]
QUESTIONS[3] = "A very long question " + "that goes on " * 30 + "and on."
GOLDS = ["yes"] * 7 + ["no"] * 3
ROLES = {"coins": "seen", "letters": "unseen"}


def right(*indices: int, n: int = 10) -> list[bool]:
    return [i in indices for i in range(n)]


def eval_rows(correct: list[bool], questions: list[str] = QUESTIONS) -> list[dict]:
    rows = []
    for question, gold, ok in zip(questions, GOLDS, correct):
        answer = gold if ok else ("no" if gold == "yes" else "maybe")
        output = "Let's think step by step. " + "The coin was not flipped. " * 12 + f"\n\n-->\n\n{answer} END"
        rows.append({"question": question, "gold": gold, "output": output, "extracted": answer, "correct": ok,
                     "correct_reference": ok, "format_ok": True, "partial": None, "source": "test"})
    return rows


def fake_run(root: Path, name: str, results: dict[str, dict[str, list[dict]]]) -> Path:
    """A run folder as the pipeline leaves it after the evaluate stage: ``results`` is
    {task: {system: rows}}."""
    config = parse_config({
        "name": name, "teacher": {"backend": "precomputed"}, "student": {"model": "builtin:tiny"},
        "tasks": [{"name": task, "role": ROLES[task], "source": {"kind": "generated", "family": "coin_flip"}}
                  for task in results]})
    storage = Storage(root / name)
    layout = RunLayout(storage)
    storage.write_text(layout.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    facts = {task: {"role": ROLES[task], "kind": "yes_no", "sizes": {"train": 20, "fewshot": 5, "test": 10},
                    "majority": {"answer": "yes", "accuracy": 0.7}} for task in results}
    storage.write_text(layout.tasks, json.dumps(facts))
    for task, systems in results.items():
        for system, rows in systems.items():
            with Unit(storage, layout.evaluation(task, system), f"key-{system}").writing(summarize(rows)) as staging:
                write_jsonl(staging / "predictions.jsonl", rows)
    return root / name


@pytest.fixture
def runs(tmp_path):
    a = fake_run(tmp_path, "run-a", {"coins": {"base": eval_rows(right(0, 1, 2, 3, 4)),
                                               "mixture": eval_rows(right(*range(8)))},
                                     "letters": {"base": eval_rows(right(0, 1))}})
    b_rows = eval_rows(right(0, 1, 2, 3, 4, 8))[::-1]  # another order: pairing is by question
    b = fake_run(tmp_path, "run-b", {"coins": {"mixture": b_rows}})
    return a, b


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_row(out: str, task: str, system_a: str) -> list[str]:
    [line] = [line for line in out.splitlines() if line.startswith(f"| {task} | {system_a} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def ci_text(a: list[bool], b: list[bool]) -> str:
    low, high = paired_bootstrap_diff_ci(a, b, resamples=2000, seed=0)
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]"


# ---- the report ----


def test_report_shows_wilson_intervals_and_test_majority(runs):
    run_a, _ = runs
    build_report(run_a)
    text = (run_a / "report.md").read_text()
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.490, 0.943), abs=1e-3)
    row = next(line for line in text.splitlines() if line.startswith("| coins | seen | 10 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # task, role, n, majority (train), test majority, base, mixture, base format, mixture format
    assert cells == ["coins", "seen", "10", "70.0", "70.0", "50.0 [23.7, 76.3]", "80.0 [49.0, 94.3]",
                     "100.0", "100.0"]
    assert "| letters | unseen | 10 | 70.0 | 70.0 | 20.0 [5.7, 51.0] | – |" in text
    assert "95% Wilson interval" in text and "upper bound" in text

    assert "Rows drawn at random" not in text  # no task was subsampled
    report = json.loads((run_a / "report.json").read_text())
    base = report["tasks"]["coins"]["eval"]["base"]
    assert (base["ci_low"], base["ci_high"]) == pytest.approx(wilson_interval(5, 10))
    assert report["tasks"]["coins"]["majority_test"] == {"answer": "yes", "accuracy": 0.7}


def test_report_samples_errors_of_the_worst_pairs(runs):
    run_a, _ = runs
    build_report(run_a)
    text = (run_a / "report.md").read_text()
    section = text.split("## Sample errors of the 3 lowest-accuracy (task, system) pairs")[1].split("\n## ")[0]
    headings = [line for line in section.splitlines() if line.startswith("### ")]
    assert headings == ["### 1. letters / base: 20.0 [5.7, 51.0] (n 10)",
                        "### 2. coins / base: 50.0 [23.7, 76.3] (n 10)",
                        "### 3. coins / mixture: 80.0 [49.0, 94.3] (n 10)"]
    assert "Rows: [eval/coins/base/predictions.jsonl](eval/coins/base/predictions.jsonl)" in section
    coins_base = section.split("### 2.")[1].split("### 3.")[0]
    errors = [line for line in coins_base.splitlines() if line.startswith("- Q: ")]
    assert len(errors) == 3  # 5 wrong, 3 shown
    assert errors[0].startswith("- Q: `Question 5: a coin is heads up")
    assert "gold `yes`, extracted `no`; output ends `…" in errors[0] and errors[0].endswith("--> no END`")
    assert (run_a / "eval/coins/base/predictions.jsonl").is_file()

    report = json.loads((run_a / "report.json").read_text())
    worst = report["worst"][0]
    assert (worst["task"], worst["system"], len(worst["errors"])) == ("letters", "base", 3)
    long_question = next(e["question"] for e in worst["errors"] if e["question"].startswith("A very long"))
    assert len(long_question) == 160 and long_question.endswith("…")


def test_worst_pairs_keeps_ten_lowest_with_errors():
    entries = [{"task": f"t{i}", "system": "base", "accuracy": i / 20, "errors": [{}]} for i in range(12)]
    entries += [{"task": "perfect", "system": "base", "accuracy": 1.0, "errors": []},
                {"task": "none", "system": "base", "accuracy": None, "errors": []}]
    assert [e["task"] for e in worst_pairs(entries[::-1])] == [f"t{i}" for i in range(10)]


# ---- modecotd compare ----


def test_compare_two_runs(capsys, runs):
    run_a, run_b = runs
    code, out, err = run_cli(capsys, "compare", str(run_a), str(run_b))
    assert code == 0, err
    # A right on 0-7, B right on 0-4 and 8: A alone right on 3, B alone on 1 -> p = 2 * (1 + 4) / 16
    assert table_row(out, "coins", "mixture") == [
        "coins", "mixture", "mixture", "10", "80.0", "60.0", "-20.0",
        ci_text(right(*range(8)), right(0, 1, 2, 3, 4, 8)), "0.625"]
    assert "| letters |" not in out and "| coins | base |" not in out  # only what both runs evaluated
    assert "diff = B - A" in out


def test_compare_two_systems_of_one_run_by_storage_and_name(capsys, runs):
    run_a, _ = runs
    code, out, err = run_cli(capsys, "compare", "run-a", "--storage", str(run_a.parent),
                             "--system", "base", "--system-b", "mixture")
    assert code == 0, err
    # base right on 0-4, mixture on 0-7: 3 discordant, all for B -> p = 2 / 8
    assert table_row(out, "coins", "base") == [
        "coins", "base", "mixture", "10", "50.0", "80.0", "+30.0",
        ci_text(right(0, 1, 2, 3, 4), right(*range(8))), "0.250"]
    assert "| letters |" not in out  # letters has no mixture


def test_compare_pairs_what_it_can_and_says_what_it_left_out(capsys, tmp_path, runs):
    run_a, _ = runs
    fewer = fake_run(tmp_path, "run-c", {"coins": {"mixture": eval_rows(right(*range(8)))[:6]}})
    code, out, err = run_cli(capsys, "compare", str(run_a), str(fewer), "--system", "mixture")
    assert code == 0, err
    assert table_row(out, "coins", "mixture")[3:7] == ["6", "100.0", "100.0", "+0.0"]
    assert "4 question(s) of A and 0 of B had no partner" in out


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("modecotd: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_compare_errors_are_one_line(capsys, tmp_path, runs):
    run_a, run_b = runs
    code, _, err = run_cli(capsys, "compare", str(run_a), str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "nowhere", "no modecotd run")
    code, _, err = run_cli(capsys, "compare", str(run_a))
    assert_one_line_error(code, err, "--system and --system-b")
    code, _, err = run_cli(capsys, "compare", str(run_a), "--system", "base", "--system-b", "expert")
    assert_one_line_error(code, err, "'expert' was not evaluated", "evaluated: base, mixture")
    code, _, err = run_cli(capsys, "compare", str(run_a), str(run_b), "--system", "base")
    assert_one_line_error(code, err, "run-b", "'base' was not evaluated")
    other = fake_run(tmp_path, "run-d", {"coins": {"mixture": eval_rows(right(1), [q + "?" for q in QUESTIONS])}})
    code, _, err = run_cli(capsys, "compare", str(run_a), str(other))
    assert_one_line_error(code, err, "coins: no question", "paired by question")


def test_compare_finds_systems_of_any_name(capsys, tmp_path):
    a = fake_run(tmp_path, "x", {"coins": {"expert-coins": eval_rows(right(0, 1, 2))}})
    b = fake_run(tmp_path, "y", {"coins": {"expert-coins": eval_rows(right(0, 1, 2, 3))}})
    code, out, err = run_cli(capsys, "compare", str(a), str(b))
    assert code == 0, err
    assert table_row(out, "coins", "expert-coins")[3:7] == ["10", "30.0", "40.0", "+10.0"]


def test_report_names_the_seed_of_subsampled_tasks(runs):
    run_a, _ = runs
    config = yaml.safe_load((run_a / "config.yaml").read_text())
    config["tasks"][0]["sizes"]["sample_seed"] = 123  # as a paper task's config would carry it
    (run_a / "config.yaml").write_text(yaml.safe_dump(config))
    build_report(run_a)
    assert "- Rows drawn at random from the data files (seed per task): coins 123" in (run_a / "report.md").read_text()


# ---- only what the run's plan wants is read ----


def plan_wanting(run: Path, **keys: str) -> None:
    """The run's plan.json as the driver writes it; ``keys`` maps task__system to the fingerprint its
    evaluation must have, in the plan's order."""
    units = [PlannedUnit(f"eval/{k.replace('__', '/')}", v, "evaluate", *k.split("__")) for k, v in keys.items()]
    (run / "plan.json").write_text(plan_json(units))


def test_a_plan_from_before_plans_named_their_units_is_still_read(tmp_path, runs):
    """Format 1, {unit folder: fingerprint}: only the units it wants count, every system probed."""
    run_a, _ = runs
    (run_a / "plan.json").write_text(json.dumps({"eval/coins/base": "key-base", "eval/coins/mixture": "key-other"}))
    build_report(run_a)
    report = json.loads((run_a / "report.json").read_text())
    assert set(report["tasks"]["coins"]["eval"]) == {"base"} and report["tasks"]["letters"]["eval"] == {}


def test_the_report_and_compare_take_the_systems_the_plan_names_in_its_order(capsys, tmp_path, runs):
    run_a, _ = runs
    plan_wanting(run_a, coins__mixture="key-mixture", coins__base="key-base", letters__base="key-base")
    from modecotd.report.collect import collect

    assert list(collect(Storage(run_a))["tasks"]["coins"]["eval"]) == ["mixture", "base"]
    code, out, err = run_cli(capsys, "compare", str(run_a), str(run_a))
    assert code == 0, err
    assert [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| coins |")] == ["mixture", "base"]


def test_a_plan_file_that_is_no_plan_is_refused_naming_it(capsys, runs):
    run_a, _ = runs
    (run_a / "plan.json").write_text('{"format": 2, "units": "all of them"}')
    code, _, err = run_cli(capsys, "report", str(run_a))
    assert_one_line_error(code, err, "plan.json", "not a modecotd plan")


def test_report_compare_and_pull_leave_out_units_the_plan_no_longer_wants(capsys, tmp_path, runs):
    run_a, run_b = runs
    # the last run wanted a new mixture for coins (its redo failed: the old unit is still there)
    plan_wanting(run_a, coins__base="key-base", coins__mixture="key-a-new-mixture", letters__base="key-base")
    build_report(run_a)
    report = json.loads((run_a / "report.json").read_text())
    assert set(report["tasks"]["coins"]["eval"]) == {"base"}  # the old mixture is not shown as current
    code, _, err = run_cli(capsys, "compare", str(run_a), str(run_b), "--system", "mixture")
    assert_one_line_error(code, err, "run-a", "'mixture' was not evaluated", "evaluated: base")
    code, out, err = run_cli(capsys, "pull", str(run_a), "--to", str(tmp_path / "pulled"))
    assert code == 0, err
    pulled = tmp_path / "pulled"
    assert (pulled / "eval/coins/base/predictions.jsonl").read_bytes() == (run_a / "eval/coins/base/predictions.jsonl").read_bytes()
    assert (pulled / "plan.json").is_file() and (pulled / "report.md").is_file()
    assert not (pulled / "eval/coins/mixture").exists()
    assert "left out 1 unit(s) the run's plan no longer wants" in out and "eval/coins/mixture" in out

    plan_wanting(run_a, coins__base="key-base")  # a system the config dropped is not current either
    build_report(run_a)
    assert json.loads((run_a / "report.json").read_text())["tasks"]["letters"]["eval"] == {}


def test_pull_checks_every_file_against_its_manifest(capsys, tmp_path, runs):
    run_a, _ = runs
    rows = run_a / "eval/coins/base/predictions.jsonl"
    text = rows.read_text()
    rows.write_text(text.replace('"correct": false', '"correct": true ', 1))  # same size, other content
    assert rows.stat().st_size == len(text.encode())
    code, _, err = run_cli(capsys, "pull", str(run_a), "--to", str(tmp_path / "pulled"))
    assert_one_line_error(code, err, "eval/coins/base", "does not match its manifest")
