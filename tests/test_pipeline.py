"""End to end on a local Ray: teacher actors, a Ray Train + DeepSpeed expert, a Ray Tune mixture
search and evaluator actors, with a tiny model on two small generated tasks; then resume."""
from __future__ import annotations

import io
import json

import pytest

from modecotd.artifacts import read_jsonl
from modecotd.config_loading import parse_config
from modecotd.jobs.driver import run_pipeline
from modecotd.progress import ProgressBoard

CONFIG = {
    "name": "e2e",
    "seed": 0,
    "tasks": [
        {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
         "sizes": {"train": 12, "fewshot": 4, "test": 6}},
        {"name": "letters", "role": "unseen",
         "source": {"kind": "generated", "family": "last_letter_concatenation", "size": 2},
         "sizes": {"train": 0, "fewshot": 4, "test": 6}},
    ],
    "teacher": {"backend": "scripted", "actors": 2, "batch_size": 4},
    "student": {"model": "builtin:tiny", "dtype": "fp32"},
    "distill": {"epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "max_length": 160, "zero_stage": 2,
                "lora": {"r": 4, "alpha": 8}, "baselines": ["multitask", "full_finetune"],
                "validation_fraction": 0.25, "checkpoint_every": 2},
    # one order and no controls here: test_seeds_controls_orders_and_the_likelihood_reading has them
    "mixture": {"budget": 4, "method": ["lorahub", "delta", "gate"], "cv_folds": 2, "scheduler": "none",
                "optimizer": "gradient", "gate_steps": 5, "gate_rows": "pooled", "orders": 1, "controls": []},
    "evaluation": {"max_new_tokens": 8, "batch_size": 8, "actors": 1},
}

UNITS = ["rationales/coins", "experts/coins", "baselines/multitask", "baselines/full_finetune", "mixtures/coins",
         "mixtures/letters", "eval/coins/base", "eval/coins/expert", "eval/coins/mixture", "eval/coins/multitask",
         "eval/coins/full_finetune", "eval/letters/base", "eval/letters/mixture", "eval/letters/multitask",
         "eval/letters/full_finetune", "eval/letters/expert-coins"]


def manifests(run_dir) -> dict[str, str]:
    return {unit: (run_dir / unit / "manifest.json").read_text() for unit in UNITS}


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    board = ProgressBoard(io.StringIO(), tty=False, line_every_s=0)
    tracking = {"mlflow": f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db"}  # no unit's fingerprint
    outcome = run_pipeline(parse_config({**CONFIG, "tracking": tracking}), run_dir, progress=board)
    first_tracking[run_dir] = tracking["mlflow"]
    results[run_dir] = what_a_run_made(run_dir)  # before later tests change the folder
    return outcome, run_dir, board.stream.getvalue().splitlines()


results: dict = {}  # run folder -> what_a_run_made, as the first run left it
first_tracking: dict = {}  # run folder -> the MLflow store the first run logged to


def what_a_run_made(run_dir) -> dict:
    """What two runs of one config must agree on: the question ids of each rationale file, each
    expert's and baseline's tensors, each mixture's choice and weights, each evaluation's outputs,
    and the report's numbers (not timings, process ids or file times)."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    made = {}
    for status in ("accepted", "rejected", "failed"):
        made[f"rationales/{status}"] = sorted(r["id"] for r in read_jsonl(run_dir / f"rationales/coins/{status}.jsonl"))
    for unit in ("experts/coins", "baselines/multitask"):
        made[unit] = {k: v.tolist() for k, v in load_file(str(run_dir / unit / "adapter_model.safetensors")).items()}
    full = load_file(str(run_dir / "baselines/full_finetune/model.safetensors"))
    made["baselines/full_finetune"] = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                                       for k, v in full.items()}  # every weight, bit for bit
    for task in ("coins", "letters"):
        mixture = json.loads((run_dir / f"mixtures/{task}/mixture.json").read_text())
        made[f"mixtures/{task}"] = (mixture["method"], mixture["setting"], mixture["weights"])
    for unit in UNITS[6:]:
        made[unit] = [(r["output"], r["correct"]) for r in read_jsonl(run_dir / unit / "predictions.jsonl")]
    report = json.loads((run_dir / "report.json").read_text())
    made["report"] = {task: {system: ev.get("accuracy") for system, ev in t["eval"].items()}
                      for task, t in report["tasks"].items()}
    return made


def test_every_stage_shows_progress_from_where_its_work_runs(first_run):
    """Lines come from the teacher stage (driver), Ray Train's rank 0 (distill), the Tune callback (mix)
    and the evaluator actors, each unit ending in a finished line."""
    lines = first_run[2]
    finished = [line for line in lines if "done in" in line]
    for unit in ("teacher coins: 12/12 questions", "distill coins: ", "distill multitask: ",
                 "mix coins: 3/3 settings", "mix letters: 3/3 settings", "evaluate coins / expert: 6/6 questions",
                 "evaluate letters / mixture: 6/6 questions"):
        assert any(line.startswith(unit) for line in finished), (unit, lines)
    steps = [line for line in lines if line.startswith("distill coins: ") and "done in" not in line]
    assert steps and all("loss" in line and "target tokens/s" in line for line in steps), lines


def test_all_stages_produce_their_artifacts(first_run, tiny_model_dir):
    from peft import PeftModel

    from modecotd.models import load_lm

    outcome, run_dir, _ = first_run
    assert outcome.failures == {}
    accepted = read_jsonl(run_dir / "rationales/coins/accepted.jsonl")
    assert len(accepted) == 12 and all(r["rationale"] for r in accepted)

    training = json.loads((run_dir / "experts/coins/training.json").read_text())
    assert training["zero_stage"] == 2  # a DeepSpeed ZeRO-2 engine did the training
    assert training["steps"] == 9  # 12 rows / batch 4 x 3 epochs
    assert sum(training["losses"][-3:]) < sum(training["losses"][:3])
    model = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(run_dir / "experts/coins"))
    assert any("lora_A" in name for name, _ in model.named_parameters())

    mixture = json.loads((run_dir / "mixtures/letters/mixture.json").read_text())
    assert set(mixture["weights"]) == {"coins"}
    assert {c["setting"].split("-")[0] for c in mixture["candidates"]} == {"lorahub", "delta", "gate"}  # all ran
    search = json.loads((run_dir / "mixtures/letters/search.json").read_text())
    assert [len(trial["history"]) for trial in search["trials"]] == [4, 5, 4]  # delta, gate (steps), lorahub
    assert mixture["cv_loss"] == min(trial["cv_loss"] for trial in search["trials"])  # picked by CV loss
    if mixture["method"] == "gate":
        assert (run_dir / "mixtures/letters/routers.safetensors").is_file()
    else:
        merged = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(run_dir / "mixtures/letters/adapter"))
        assert any("lora_B" in name for name, _ in merged.named_parameters())
    # each Tune worker loaded the student once and reused it for its later trials
    trials = [t for task in ("coins", "letters") for t in
              json.loads((run_dir / f"mixtures/{task}/search.json").read_text())["trials"]]
    per_worker = {}
    for trial in trials:
        per_worker.setdefault(trial["worker_pid"], []).append(trial["load_seconds"])
    assert max(len(loads) for loads in per_worker.values()) > 1
    assert all(sum(seconds > 0 for seconds in loads) == 1 for loads in per_worker.values())

    full = json.loads((run_dir / "baselines/full_finetune/training.json").read_text())
    assert full["steps"] == 9 and (run_dir / "baselines/full_finetune/config.json").is_file()
    assert load_lm(run_dir / "baselines/full_finetune") is not None  # a whole model, not an adapter
    assert training["validation_examples"] == 3 and training["validation_losses"]

    for unit in UNITS[6:]:
        rows = read_jsonl(run_dir / unit / "predictions.jsonl")
        assert len(rows) == 6 and {"output", "extracted", "correct", "format_ok"} <= set(rows[0])

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["tasks"]["coins"]["eval"]) == {"base", "expert", "mixture", "multitask", "full_finetune"}
    assert set(report["tasks"]["letters"]["eval"]) == {"base", "mixture", "multitask", "full_finetune",
                                                       "expert-coins"}  # the unseen task: each expert alone
    unseen = (run_dir / "report.md").read_text().split("## Unseen task letters")[1].split("\n## ")[0]
    assert "| expert-coins | " in unseen and "| mixture | " in unseen and "majority (test answers)" in unseen
    assert "## Three readings of the answers" in (run_dir / "report.md").read_text()
    assert (run_dir / "accuracy.png").stat().st_size > 1000
    assert (run_dir / "training.png").stat().st_size > 1000
    assert (run_dir / "mixture_weights.png").stat().st_size > 1000 and (run_dir / "search.png").stat().st_size > 1000
    assert "| letters | " in (run_dir / "report.md").read_text().split("## Mixtures")[1]
    html = (run_dir / "report.html").read_text()  # self-contained: the plots are inside
    assert html.count("data:image/png;base64,") >= 4 and 'src="accuracy.png"' not in html and "<table>" in html
    assert "| distill | " in (run_dir / "report.md").read_text().split("## Wall time and resources")[1]
    assert "| coins | seen | 6 |" in (run_dir / "report.md").read_text()
    assert outcome.report == str(run_dir / "report.md")


def test_every_stage_logs_to_the_runs_trackers(first_run):
    """tracking.mlflow: each training's loss per step and its adapter, each Tune trial, the evaluation's
    accuracies (as report.json has them) and the report's files; TensorBoard files for each training."""
    import mlflow

    _, run_dir, _ = first_run
    client = mlflow.MlflowClient(tracking_uri=first_tracking[run_dir])
    experiment = client.get_experiment_by_name("modecotd-e2e")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    stages = sorted(run.data.tags.get("modecotd.stage") for run in runs.values())
    assert stages.count("distill") == 3 and stages.count("mix") == 6 and stages.count("evaluate") == 1, stages
    training = json.loads((run_dir / "experts/coins/training.json").read_text())
    losses = client.get_metric_history(runs["distill coins"].info.run_id, "loss")
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(training["losses"])
    assert "adapter/adapter_model.safetensors" in [
        a.path for a in client.list_artifacts(runs["distill coins"].info.run_id, "adapter")]
    results = runs["evaluate results"]
    report = json.loads((run_dir / "report.json").read_text())
    assert results.data.metrics["coins.expert.accuracy"] == report["tasks"]["coins"]["eval"]["expert"]["accuracy"]
    assert "report/report.md" in [a.path for a in client.list_artifacts(results.info.run_id, "report")]
    assert list((run_dir / "tensorboard" / "distill" / "coins").glob("events.out.tfevents.*"))


def test_rerun_skips_finished_units(first_run):
    outcome, run_dir, _ = first_run
    before = manifests(run_dir)
    again = run_pipeline(parse_config(CONFIG), run_dir)
    assert again.failures == {}
    assert manifests(run_dir) == before  # nothing redone


def test_a_mix_stage_cut_short_scores_no_setting_twice_and_leaves_no_unfinished_search(first_run):
    outcome, run_dir, _ = first_run
    mixture = json.loads((run_dir / "mixtures/coins/mixture.json").read_text())
    search = (run_dir / "mixtures/coins/search.json").read_text()
    searches = sorted(p.name for p in (run_dir / "ray").glob("mix-*"))
    (run_dir / "mixtures/coins/manifest.json").unlink()  # as if the driver died after the trials, before the commit
    cut_short = run_dir / "ray" / f"mix-{CONFIG.get('seed', 0)}-1" / "coins-0001"
    cut_short.mkdir(parents=True)  # Tune's folder of a search a crash cut short
    (cut_short / "result.json").write_text("{}")
    again = run_pipeline(parse_config(CONFIG), run_dir, stages=["mix"])
    assert again.failures == {}
    assert json.loads((run_dir / "mixtures/coins/mixture.json").read_text())["weights"] == mixture["weights"]
    assert (run_dir / "mixtures/coins/search.json").read_text() == search  # the trials' records, read back from Tune
    assert sorted(p.name for p in (run_dir / "ray").glob("mix-*")) == searches  # no new search, none cut short


def test_changed_mixer_setting_redoes_only_what_depends_on_it(first_run):
    outcome, run_dir, _ = first_run
    before = manifests(run_dir)
    changed = json.loads(json.dumps(CONFIG))
    changed["mixture"]["budget"] = 3
    run_pipeline(parse_config(changed), run_dir)
    after = manifests(run_dir)
    redone = {unit for unit in UNITS if after[unit] != before[unit]}
    assert redone == {"mixtures/coins", "mixtures/letters", "eval/coins/mixture", "eval/letters/mixture"}


def test_a_seq2seq_student_runs_end_to_end(ray_cluster, tiny_t5_dir, tmp_path):
    """The paper's students are Flan-T5: the same stages with a tiny encoder-decoder."""
    from peft import PeftModel

    from modecotd.models import load_lm

    config = json.loads(json.dumps(CONFIG))
    config["student"]["model"] = "builtin:tiny-t5"
    config["distill"].update(baselines=[], validation_fraction=0.0, zero_stage=3)
    config["mixture"].update(method="lorahub", cv_folds=0)
    outcome = run_pipeline(parse_config(config), tmp_path)
    assert outcome.failures == {}
    training = json.loads((tmp_path / "experts/coins/training.json").read_text())
    assert training["zero_stage"] == 3 and training["final_loss"] < training["first_loss"]
    expert = PeftModel.from_pretrained(load_lm(tiny_t5_dir), str(tmp_path / "experts/coins"))
    assert type(expert).__name__ == "PeftModelForSeq2SeqLM"
    mixture = json.loads((tmp_path / "mixtures/letters/mixture.json").read_text())
    assert set(mixture["weights"]) == {"coins"}
    for unit in ["eval/coins/base", "eval/coins/expert", "eval/coins/mixture", "eval/letters/mixture"]:
        rows = read_jsonl(tmp_path / unit / "predictions.jsonl")
        assert len(rows) == 6 and all("Q:" not in row["output"] for row in rows)  # no echoed prompt


def test_report_is_rebuilt_from_the_run_folder_alone(first_run, capsys):
    from modecotd.cli import main

    _, run_dir, _ = first_run
    before = (run_dir / "report.md").read_text()
    for name in ("report.md", "report.json", "accuracy.png", "mixture_weights.png"):
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == before and (run_dir / "mixture_weights.png").is_file()
    assert main(["report", str(run_dir / "experts")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_the_plan_names_every_unit_and_a_unit_not_redone_for_a_new_config_is_not_reported(first_run):
    from modecotd.run_view import RunView
    from modecotd.storage import Storage

    _, run_dir, _ = first_run
    plan = json.loads((run_dir / "plan.json").read_text())
    planned = {unit["prefix"]: unit["key"] for unit in plan["units"]}
    what = {u["prefix"]: (u["stage"], u["task"], u["system"]) for u in plan["units"]}
    assert [what[unit] for unit in UNITS] == [
        ("teacher", "coins", None), ("distill", "coins", "expert"), ("distill", None, "multitask"),
        ("distill", None, "full_finetune"), ("mix", "coins", "mixture"), ("mix", "letters", "mixture"),
        *[("evaluate", "coins", s) for s in ("base", "expert", "mixture", "multitask", "full_finetune")],
        *[("evaluate", "letters", s) for s in ("base", "mixture", "multitask", "full_finetune", "expert-coins")]]
    assert {unit: json.loads((run_dir / unit / "manifest.json").read_text())["fingerprint"] for unit in UNITS} \
        == {unit: planned[unit] for unit in UNITS}
    assert RunView(Storage(run_dir)).units()[1] == []  # no stale unit
    run_pipeline(parse_config(CONFIG), run_dir, stages=["teacher"])  # CONFIG's plan (an earlier test changed it)
    before = json.loads((run_dir / "report.json").read_text())["tasks"]["coins"]["eval"]
    assert {"base", "expert"} <= set(before)
    changed = json.loads(json.dumps(CONFIG))
    changed["evaluation"]["max_new_tokens"] = 9  # every evaluation is now another unit, not yet made
    run_pipeline(parse_config(changed), run_dir, stages=["teacher"])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tasks"]["coins"]["eval"] == {} and "expert" in report["tasks"]["coins"]  # the expert still is
    run_pipeline(parse_config(CONFIG), run_dir, stages=["teacher"])  # the first config's plan again
    assert json.loads((run_dir / "report.json").read_text())["tasks"]["coins"]["eval"] == before


def test_one_stage_runs_on_the_earlier_stages_artifacts(ray_cluster, tmp_path):
    from modecotd.errors import UserError

    config = parse_config(CONFIG)
    outcome = run_pipeline(config, tmp_path, stages=["teacher"])
    assert outcome.failures == {} and set(outcome.seconds) == {"teacher"}
    assert (tmp_path / "rationales/coins/accepted.jsonl").is_file() and not (tmp_path / "experts").exists()
    with pytest.raises(UserError, match="needs the distill stage's outputs.*experts/coins"):
        run_pipeline(config, tmp_path, stages=["mix"])


def test_tune_searches_only_the_mixer_with_a_space_from_the_command_line(first_run, tmp_path):
    import yaml

    from modecotd.cli import main

    _, run_dir, _ = first_run
    evals_before = manifests(run_dir)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(CONFIG))
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["tune", str(config_file), "--run-dir", str(run_dir), "--method", "delta", "--l1", "0.01,0.2",
                 "--top-k", "all", "--budget", "3", "--scheduler", "none",
                 "--set", f"tracking.mlflow={mlflow_uri}"]) == 0
    mixture = json.loads((run_dir / "mixtures/letters/mixture.json").read_text())
    assert mixture["method"] == "delta" and mixture["budget"] == 3
    assert sorted(c["setting"] for c in mixture["candidates"]) == [
        "delta-budget=3-bound=3.0-l1=0.01-top_k=all", "delta-budget=3-bound=3.0-l1=0.2-top_k=all"]
    after = manifests(run_dir)
    assert {u for u in UNITS if after[u] != evals_before[u]} == {"mixtures/coins", "mixtures/letters"}
    # every trial went to MLflow as well as to TensorBoard
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["modecotd-e2e"], output_format="list",
                              filter_string="tags.`modecotd.stage` = 'mix'")
    assert len(runs) == 4 and all("cv_loss" in run.data.metrics for run in runs)
    assert list(run_dir.glob("ray/mix-*/*/events.out.tfevents.*"))


def test_asha_stops_a_poor_setting_and_the_mixture_is_chosen_among_the_rest(first_run):
    """The default scheduler end to end: trials one at a time (so the run is the same every time),
    ASHA after the first fold; a stopped setting leaves a checkpoint with no record (see
    MixtureTrial.save_checkpoint) and is not a candidate."""
    _, run_dir, _ = first_run
    config = json.loads(json.dumps(CONFIG))
    config["mixture"].update(scheduler="asha", method=["lorahub"], cv_folds=3, budget=3, l1=[0.0, 0.5],
                             bound=[0.05, 3.0], max_concurrent_trials=1)
    outcome = run_pipeline(parse_config(config), run_dir, stages=["mix"])
    assert outcome.failures == {}
    mixture = json.loads((run_dir / "mixtures/letters/mixture.json").read_text())
    trials = json.loads((run_dir / "mixtures/letters/search.json").read_text())["trials"]
    assert mixture["settings_tried"] == 4 and 1 <= len(trials) == len(mixture["candidates"])
    print("asha: scored to the end", [t["setting"] for t in trials])
    assert len(trials) < 4, "no setting was stopped early"
    assert mixture["setting"] in [t["setting"] for t in trials]


def test_each_method_can_be_a_system_of_its_own(first_run):
    """mixture.systems per_method: a mixture per method and target, each chosen among its own
    settings (one trial per setting and task) and evaluated side by side in the report. With one
    setting per method (cv_folds 0) there is nothing to choose: the weights are fitted once on all
    few-shot rows."""
    _, run_dir, _ = first_run
    config = json.loads(json.dumps(CONFIG))
    config["mixture"].update(systems="per_method", cv_folds=0, budget=3)
    outcome = run_pipeline(parse_config(config), run_dir, stages=["mix", "evaluate"])
    assert outcome.failures == {}
    for method in ("lorahub", "delta", "gate"):
        mixture = json.loads((run_dir / f"mixtures/letters.{method}/mixture.json").read_text())
        assert mixture["method"] == method and mixture["system"] == f"mixture-{method}"
        trials = json.loads((run_dir / f"mixtures/letters.{method}/search.json").read_text())["trials"]
        assert [t["method"] for t in trials] == [method] and trials[0]["fold_losses"] == []
        assert mixture["cv_loss"] is None and (method == "gate" or len(trials[0]["history"]) == 3)
        assert len(read_jsonl(run_dir / f"eval/letters/mixture-{method}/predictions.jsonl")) == 6
    report = json.loads((run_dir / "report.json").read_text())
    assert {"mixture-lorahub", "mixture-delta", "mixture-gate"} <= set(report["tasks"]["coins"]["eval"])
    mixtures = (run_dir / "report.md").read_text().split("## Mixtures")[1]
    assert "| letters (mixture-gate) | gate |" in mixtures and "– (no CV; fit" in mixtures


PLAIN_DECODE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, prompts_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
if adapter != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
tokenizer = AutoTokenizer.from_pretrained(adapter if adapter != "-" else base)
outputs = []
for prompt in json.load(open(prompts_file)):
    ids = tokenizer(prompt, return_tensors="pt")
    new = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    outputs.append(text[: text.index("END") + 3] if "END" in text else text)
print(json.dumps({"outputs": outputs, "modecotd_imported": any(m.startswith("modecotd") for m in sys.modules)}))
"""


def decode_without_modecotd(tmp_path, base, adapter, unit_dir) -> list[tuple[str, str]]:
    """(the run's output, plain transformers + peft's greedy output) for each test row of an evaluation
    unit, decoded in a process that never imports modecotd."""
    import subprocess
    import sys

    from modecotd.prompts import student_prompt
    from modecotd.tasks.schema import AnswerKind

    rows = read_jsonl(unit_dir / "predictions.jsonl")
    kind = AnswerKind(json.loads((unit_dir.parents[2] / "tasks.json").read_text())[unit_dir.parent.name]["kind"])
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps([student_prompt(r["question"], kind) for r in rows]))
    done = subprocess.run([sys.executable, "-c", PLAIN_DECODE, str(base), str(adapter), str(prompts_file)],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["modecotd_imported"] and any(row["output"] for row in rows)
    return [(row["output"], plain) for row, plain in zip(rows, result["outputs"])]


def test_an_exported_system_loads_without_modecotd_and_gives_the_runs_predictions(first_run, tmp_path, capsys):
    """`modecotd export`: the expert as a peft adapter and the delta mixture merged into the student,
    each loaded by plain transformers + peft in another process, write the run's own outputs on the
    test rows; a gate mixture and the base student are refused with the reason."""
    from modecotd.cli import main

    _, run_dir, _ = first_run
    config = json.loads(json.dumps(CONFIG))
    config["mixture"].update(systems="per_method", cv_folds=0, budget=3)
    run_pipeline(parse_config(config), run_dir, stages=["mix", "evaluate"])  # as the test above: a no-op after it

    assert main(["export", str(run_dir), "--task", "coins", "--system", "expert", "--to", str(tmp_path / "expert")]) == 0
    adapter = tmp_path / "expert"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "builtin:tiny"  # the config's reference, not a cache path
    card = (adapter / "README.md").read_text()
    accuracy = read_jsonl(run_dir / "eval/coins/expert/predictions.jsonl")
    assert f"| {100 * sum(r['correct'] for r in accuracy) / len(accuracy):.1f} |" in card and "Q: {question}" in card
    tiny = tmp_path / "tiny"  # the base model as another machine would have it: a plain folder
    from modecotd.models import BUILTIN_TINY, materialize
    import shutil
    shutil.copytree(materialize(BUILTIN_TINY), tiny)
    pairs = decode_without_modecotd(tmp_path, tiny, adapter, run_dir / "eval/coins/expert")
    assert all(run == plain for run, plain in pairs), pairs

    assert main(["export", str(run_dir), "--task", "letters", "--system", "mixture-delta", "--merge",
                 "--to", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert "delta mixture of the experts (coins " in (merged / "README.md").read_text()
    pairs = decode_without_modecotd(tmp_path, merged, "-", run_dir / "eval/letters/mixture-delta")
    assert all(run == plain for run, plain in pairs), pairs

    capsys.readouterr()
    assert main(["export", str(run_dir), "--task", "letters", "--system", "mixture-gate", "--to",
                 str(tmp_path / "gate")]) == 2
    assert "gate mixture weighs the experts anew at every token" in capsys.readouterr().err
    assert not (tmp_path / "gate").exists()
    assert main(["export", str(run_dir), "--task", "coins", "--system", "base", "--to", str(tmp_path / "b")]) == 2
    assert main(["export", str(run_dir), "--task", "coins", "--system", "expert", "--to", str(adapter)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_seeds_controls_orders_and_the_likelihood_reading(ray_cluster, tmp_path):
    """Two seeds, the three controls, lorahub over two orders and the likelihood reading, on the coin
    flip and its twin as the unseen target: each seed trains and mixes on its own (the second under
    seed-1/), the teacher and the base student are shared, every control is a system of every
    target, and the report gives seeds, orders and the three readings. (Two experts' controls and
    orders: tests/test_mixture_search.py.) The student reads its prompts through its chat template
    here (student.prompt_format chat), in the distill workers, the Tune trials and the evaluators."""
    config = json.loads(json.dumps(CONFIG))
    config["seeds"] = [0, 1]
    config["student"] = {**CONFIG["student"], "prompt_format": "chat"}
    config["tasks"] = [
        CONFIG["tasks"][0],
        {"name": "lamp", "role": "unseen", "source": {"kind": "generated", "family": "coin_flip", "size": 2,
                                                      "seed": 9, "wording": "twin"},
         "sizes": {"train": 0, "fewshot": 4, "test": 6}}]
    config["distill"].update(baselines=[], validation_fraction=0.0, epochs=1)
    config["mixture"] = {"method": "lorahub", "optimizer": "ngopt", "budget": 3, "orders": 2, "cv_folds": 0,
                         "fewshot_lora_epochs": 2}
    outcome = run_pipeline(parse_config(config), tmp_path)
    assert outcome.failures == {}
    assert not list(tmp_path.glob("ray/mix-*/**/error.txt"))  # no trial failed, a control's first included
    for seed_folder in ("", "seed-1/"):
        for unit in ("experts/coins", "baselines/fewshot_lora-lamp", "mixtures/lamp",
                     "mixtures/lamp.uniform", "mixtures/lamp.best_expert", "eval/lamp/fewshot_lora",
                     "eval/lamp/uniform", "eval/lamp/best_expert", "eval/lamp/mixture", "eval/coins/expert"):
            assert (tmp_path / seed_folder / unit / "manifest.json").is_file(), seed_folder + unit
    assert not (tmp_path / "seed-1/rationales").exists() and not (tmp_path / "seed-1/eval/lamp/base").exists()
    assert not (tmp_path / "baselines/fewshot_lora-coins").exists()  # a seen target has its expert
    first, second = (json.loads((tmp_path / f / "experts/coins/manifest.json").read_text()) for f in ("", "seed-1"))
    assert first["fingerprint"] != second["fingerprint"]
    uniform = json.loads((tmp_path / "mixtures/lamp.uniform/mixture.json").read_text())
    assert uniform["weights"] == {"coins": 1.0} and uniform["control"] == "uniform" and uniform["method"] == "delta"
    searched = json.loads((tmp_path / "seed-1/mixtures/lamp/mixture.json").read_text())
    assert len(searched["orders"]) == 2 and set(searched["weight_range"]) == {"coins"}
    rows = read_jsonl(tmp_path / "seed-1/eval/lamp/mixture/predictions.jsonl")
    assert len(rows) == 6 and all(r["likely_answer"] in ("yes", "no") for r in rows)

    report = json.loads((tmp_path / "report.json").read_text())
    lamp = report["tasks"]["lamp"]["eval"]
    assert report["seeds"] == [0, 1] and set(lamp["mixture"]["by_seed"]) == {"0", "1"}
    assert "by_seed" not in lamp["base"] and lamp["mixture"]["accuracy_likelihood"] is not None
    assert {"uniform", "best_expert", "fewshot_lora"} <= set(lamp)
    overs = {c["over"] for c in report["changes"] if c["role"] == "unseen"}
    assert {"base", "uniform", "best_expert", "fewshot_lora"} <= overs
    assert all(c["seeds"] == 2 for c in report["changes"])
    assert "likelihood" in report["readings"]
    text = (tmp_path / "report.md").read_text()
    assert "## Seeds" in text and "### Order of the experts" in text and "| lamp | mixture | " in text
    assert "prompt format chat: its tokenizer's chat template" in text


# --------------------------------------------------------------------------- kill -9 in every stage

# Ray's process titles (ray::<class>). A scripted teacher's actors live a fraction of a second, too
# short to catch reliably here; tests/test_teacher_stage.py kills one mid-stage (a slow endpoint).
VICTIMS = ("RayTrainWorker", "MixtureTrial", "Evaluator")
STALL_S = 10  # resources.stall_timeout_s of the run whose training workers are stopped


class Killer:
    """Stops (SIGSTOP) every Ray Train worker once the expert's first checkpoint is registered, so
    that the job must notice the silence and resume from that checkpoint; kills (SIGKILL) one process
    of each other :data:`VICTIMS` among a driver's descendants as soon as it shows up; then the
    driver itself once the evaluation stage has lost its actor."""

    def __init__(self, driver_pid: int, run_dir):
        import threading

        self.driver_pid = driver_pid
        self.run_dir = run_dir
        self.committed: dict[str, bytes] = {}  # every unit's manifest when the driver was killed
        self.killed: dict[str, float] = {}
        self.orphans: list = []  # the driver's descendants when it was killed (its local Ray)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _expert_checkpointed(self) -> bool:
        """True once Ray Train's controller has registered a checkpoint of the expert's job."""
        snapshots = list(self.run_dir.glob("ray/distill-coins-*/checkpoint_manager_snapshot.json"))
        return bool(snapshots) and "checkpoint_" in snapshots[0].read_text(errors="ignore")

    def _watch(self) -> None:
        import contextlib
        import os
        import signal
        import time

        import psutil

        driver = psutil.Process(self.driver_pid)
        while not self.stop.is_set():
            try:
                processes = driver.children(recursive=True)
            except psutil.Error:
                return
            for process in processes:
                try:
                    title = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                for victim in VICTIMS:
                    if victim in self.killed or not title.startswith(f"ray::{victim}"):
                        continue
                    if victim != "RayTrainWorker":
                        os.kill(process.pid, signal.SIGKILL)
                        self.killed[victim] = time.time()
                    elif self._expert_checkpointed():  # every training worker alive now: the expert's among them
                        for worker in processes:
                            with contextlib.suppress(psutil.Error):
                                if " ".join(worker.cmdline()).startswith("ray::RayTrainWorker"):
                                    os.kill(worker.pid, signal.SIGSTOP)
                        self.killed[victim] = time.time()
            if "Evaluator" in self.killed and time.time() - self.killed["Evaluator"] > 3:
                self.orphans = processes
                os.kill(self.driver_pid, signal.SIGKILL)
                self.committed = {str(p.relative_to(self.run_dir)): p.read_bytes()
                                  for p in self.run_dir.glob("**/manifest.json") if "/." not in str(p)}
                self.killed["driver"] = time.time()
                return
            time.sleep(0.05)


def test_a_process_killed_in_every_stage_and_then_the_driver_leave_what_an_undisturbed_run_makes(first_run,
                                                                                                 tmp_path):
    """SIGSTOP of the training workers after the expert's first checkpoint (they neither work nor die:
    the job must notice and resume from that checkpoint), kill -9 of a Tune trial's worker and an
    evaluation actor, then of the driver; the same command run again finishes, and the run equals
    the first one. Secrets planted
    in the run's environment (storage keys, an API key) show up in no file of the run folder, no Ray
    log of either run and nothing either run printed."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    reference = results[first_run[1]]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "resources": {"stall_timeout_s": STALL_S}}))  # not in any fingerprint
    command = [sys.executable, "-m", "modecotd.cli", "run", str(config), "--run-dir", str(tmp_path / "run")]
    secrets = ("aws-planted-3b8f-never-written", "sk-planted-7d1e0c9b-never-written")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": secrets[0], "OPENAI_API_KEY": secrets[1]}
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killer = Killer(process.pid, tmp_path / "run")
    killer.thread.start()
    try:
        output = process.communicate(timeout=600)[0]
    finally:
        killer.stop.set()
        if process.poll() is None:
            process.kill()
    assert set(killer.killed) == set(VICTIMS) | {"driver"}, (killer.killed, output[-3000:])
    assert process.returncode == -9, output[-3000:]
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    import psutil

    # The killed driver's local Ray went down with it (its GCS, raylet and workers) while the re-run ran
    _, alive = psutil.wait_procs(killer.orphans, timeout=20)
    left = {process.pid: process.name() for process in alive if process.is_running()}
    for process in alive:
        process.kill()
    assert not left, left

    sessions = [s for s in Path("/tmp/ray").glob("session_2*") if s.stat().st_mtime >= started - 1]
    assert sessions  # both runs' own local Ray
    for folder in [tmp_path / "run", *sessions]:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(secret.encode() in data for secret in secrets), path
    assert not any(secret in output + again.stdout + again.stderr for secret in secrets)
    assert what_a_run_made(tmp_path / "run") == reference
    training = json.loads((tmp_path / "run" / "experts/coins/training.json").read_text())
    assert training["resumed_from_step"] in (2, 4, 6, 8), training["resumed_from_step"]  # from a checkpoint
    # the units committed before the driver died were kept as they were, not redone
    assert "rationales/coins/manifest.json" in killer.committed and "experts/coins/manifest.json" in killer.committed
    for name, manifest in killer.committed.items():
        assert (tmp_path / "run" / name).read_bytes() == manifest, name
