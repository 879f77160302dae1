"""The typed plan: every unit of a run, where it lives, and which settings its fingerprint follows."""
from __future__ import annotations

import copy

import pytest

from modecotd.config_loading import parse_config
from modecotd.errors import ConfigError
from modecotd.plan import SystemSpec
from modecotd.jobs.driver import load_tasks
from modecotd.plan import SYSTEMS, Plan, RunLayout
from modecotd.storage import Storage

CONFIG = {
    "name": "plan",
    "tasks": [
        {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
         "sizes": {"train": 8, "fewshot": 2, "test": 4}},
        {"name": "sums", "role": "seen", "source": {"kind": "generated", "family": "arithmetic", "size": 2},
         "sizes": {"train": 8, "fewshot": 2, "test": 4}},
        {"name": "letters", "role": "unseen",
         "source": {"kind": "generated", "family": "last_letter_concatenation", "size": 2},
         "sizes": {"train": 0, "fewshot": 2, "test": 4}},
    ],
    "teacher": {"backend": "scripted"},
    "student": {"model": "builtin:tiny", "dtype": "fp32"},
    "distill": {"baselines": ["multitask"]},
    "mixture": {"controls": []},  # the controls' units: test_controls_are_systems_of_every_target_task
}


def plan_of(raw: dict, root) -> Plan:
    config = parse_config(raw)
    return Plan(config, load_tasks(config), RunLayout(Storage(root)))


def keys(plan: Plan) -> dict[str, str]:
    """Every unit's key by its path in the run folder (evaluations of every system, built or not)."""
    units = plan.units("teacher") + plan.units("distill") + plan.units("mix")
    units += [e.unit for e in plan.evaluations(built_only=False)]
    return {u.prefix: u.key for u in units}


def commit(unit, summary: dict | None = None) -> None:
    with unit.writing(summary) as staging:
        (staging / "weights.bin").write_bytes(b"w")


def test_every_unit_lives_under_the_run_folder_in_its_stage_folder(tmp_path):
    plan = plan_of(CONFIG, tmp_path)
    assert sorted(keys(plan)) == sorted([
        "rationales/coins", "rationales/sums", "experts/coins", "experts/sums", "baselines/multitask",
        "mixtures/coins", "mixtures/sums", "mixtures/letters",
        *(f"eval/{task}/{system}" for task in ("coins", "sums") for system in ("base", "expert", "mixture", "multitask")),
        "eval/letters/base", "eval/letters/expert-coins", "eval/letters/expert-sums", "eval/letters/mixture",
        "eval/letters/multitask"])
    assert [t.name for t in plan.trainings.values() if t.baseline] == ["multitask"]
    assert plan.trainings["multitask"].sources == tuple(plan.trainings[n].sources[0] for n in ("coins", "sums"))


def test_resource_settings_change_no_key_and_a_changed_setting_redoes_what_depends_on_it(tmp_path):
    before = keys(plan_of(CONFIG, tmp_path))
    resources = copy.deepcopy(CONFIG)
    resources["distill"].update(cpus_per_worker=2, max_concurrent_jobs=1, gradient_checkpointing=True)
    resources["teacher"].update(actors=4, max_restarts=0)
    resources["mixture"] = {"cpus_per_trial": 2, "max_concurrent_trials": 1, "controls": []}
    resources["evaluation"] = {"actors": 3}
    assert keys(plan_of(resources, tmp_path)) == before

    taught = copy.deepcopy(CONFIG)
    taught["teacher"]["samples"] = 3
    after = keys(plan_of(taught, tmp_path))
    changed = {path for path in before if before[path] != after[path]}
    # the rationales, then every expert and baseline on them, then what evaluates those (with no
    # expert trained yet, the mixtures' keys follow no expert: see the last test)
    assert changed == {path for path in before if not path.endswith(("/base", "/mixture"))
                       and not path.startswith("mixtures/")}
    assert {"eval/letters/expert-coins", "eval/letters/expert-sums"} <= changed  # each expert alone, unseen

    mixed = copy.deepcopy(CONFIG)
    mixed["mixture"] = {"l1": 0.2, "controls": []}
    after = keys(plan_of(mixed, tmp_path))
    assert {path for path in before if before[path] != after[path]} == {
        "mixtures/coins", "mixtures/sums", "mixtures/letters",
        "eval/coins/mixture", "eval/sums/mixture", "eval/letters/mixture"}


def test_adding_a_baseline_retrains_no_expert(tmp_path):
    more = copy.deepcopy(CONFIG)
    more["distill"]["baselines"] = ["multitask", "full_finetune"]
    before, after = keys(plan_of(CONFIG, tmp_path)), keys(plan_of(more, tmp_path))
    assert after["experts/coins"] == before["experts/coins"] and after["experts/sums"] == before["experts/sums"]
    assert "baselines/full_finetune" in after and "baselines/full_finetune" not in before


def test_mixtures_follow_the_experts_trained_and_only_built_systems_are_evaluated(tmp_path):
    plan = plan_of(CONFIG, tmp_path)
    assert [(e.task, e.system.name) for e in plan.evaluations()] == [("coins", "base"), ("sums", "base"),
                                                                       ("letters", "base")]
    nothing_trained = plan.mixtures()["letters"].unit.key
    commit(plan.trainings["coins"].unit)
    one_trained = plan.mixtures()["letters"].unit
    assert one_trained.key != nothing_trained
    assert ("coins", "expert") in [(e.task, e.system.name) for e in plan.evaluations()]
    alone = next(e for e in plan.evaluations() if (e.task, e.system.name) == ("letters", "expert-coins"))
    assert alone.system.spec() == SystemSpec("expert", adapter=plan.trainings["coins"].unit)
    assert ("letters", "expert-sums") not in [(e.task, e.system.name) for e in plan.evaluations()]  # not built

    commit(one_trained, {"method": "lorahub", "weights": {"coins": 0.5}})
    evaluation = next(e for e in plan.evaluations() if (e.task, e.system.name) == ("letters", "mixture"))
    assert evaluation.system.spec() == SystemSpec("mixture", method="lorahub", weights={"coins": 0.5},
                                                  experts={"coins": plan.trainings["coins"].unit})
    assert evaluation.unit.prefix == "eval/letters/mixture" and evaluation.unit.storage == Storage(tmp_path)
    expert = next(e for e in plan.evaluations() if (e.task, e.system.name) == ("coins", "expert"))
    assert expert.system.spec() == SystemSpec("expert", adapter=plan.trainings["coins"].unit)
    assert expert.system.spec().adapter.local() == tmp_path / "experts" / "coins"


def test_per_method_mixtures_are_systems_of_their_own_keyed_by_their_settings_alone(tmp_path):
    each = copy.deepcopy(CONFIG)
    each["mixture"] = {"method": ["lorahub", "gate"], "systems": "per_method", "cv_folds": 0, "controls": []}
    plan = plan_of(each, tmp_path)
    mixings = plan.mixtures()
    assert sorted(mixings) == ["coins.gate", "coins.lorahub", "letters.gate", "letters.lorahub", "sums.gate",
                               "sums.lorahub"]
    assert mixings["letters.gate"].unit.prefix == "mixtures/letters.gate"
    assert [s["method"] for s in mixings["letters.lorahub"].settings] == ["lorahub"]
    systems = [e.system.name for e in plan.evaluations(built_only=False) if e.task == "letters"]
    assert "mixture-lorahub" in systems and "mixture-gate" in systems and "mixture" not in systems
    assert next(e for e in plan.evaluations(built_only=False)
                if (e.task, e.system.name) == ("letters", "mixture-gate")).unit.prefix == "eval/letters/mixture-gate"
    # a setting of the weighted methods leaves the gate's mixtures (and their evaluations) as they were
    lower = copy.deepcopy(each)
    lower["mixture"]["l1"] = 0.2
    before, after = keys(plan), keys(plan_of(lower, tmp_path))
    assert after["mixtures/letters.gate"] == before["mixtures/letters.gate"]
    assert after["mixtures/letters.lorahub"] != before["mixtures/letters.lorahub"]


def test_evaluations_go_system_by_system_and_each_expert_alone_last(tmp_path):
    order = [(e.task, e.system.name) for e in plan_of(CONFIG, tmp_path).evaluations(built_only=False)]
    assert order == [("coins", "base"), ("sums", "base"), ("letters", "base"), ("coins", "expert"),
                     ("sums", "expert"), ("coins", "mixture"), ("sums", "mixture"), ("letters", "mixture"),
                     ("coins", "multitask"), ("sums", "multitask"), ("letters", "multitask"),
                     ("letters", "expert-coins"), ("letters", "expert-sums")]
    systems = [name for _, name in order]  # the report's and compare's order too: one order
    assert sorted(set(systems) & set(SYSTEMS), key=systems.index) == [s for s in SYSTEMS if s in systems]


def test_experts_alone_can_be_left_out_without_changing_any_key(tmp_path):
    without = copy.deepcopy(CONFIG)
    without["evaluation"] = {"experts_alone": False}
    before, after = keys(plan_of(CONFIG, tmp_path)), keys(plan_of(without, tmp_path))
    assert set(before) - set(after) == {"eval/letters/expert-coins", "eval/letters/expert-sums"}
    assert all(after[prefix] == before[prefix] for prefix in after)


def test_controls_are_systems_of_every_target_task(tmp_path):
    """uniform and best_expert are fixed-weight mixtures of the mix stage, for every target;
    fewshot_lora is a training on an unseen target's own few-shot rows, evaluated on that task
    alone; none changes an expert's key."""
    with_controls = copy.deepcopy(CONFIG)
    with_controls["mixture"] = {}  # every control, the default
    plan = plan_of(with_controls, tmp_path)
    before, after = keys(plan_of(CONFIG, tmp_path)), keys(plan)
    assert all(after[prefix] == before[prefix] for prefix in before)
    assert set(after) - set(before) == {
        *(f"mixtures/{task}.{control}" for task in ("coins", "sums", "letters") for control in ("uniform", "best_expert")),
        "baselines/fewshot_lora-letters",  # unseen targets only: a seen one has its expert
        *(f"eval/{task}/{system}" for task in ("coins", "sums", "letters") for system in ("uniform", "best_expert")),
        "eval/letters/fewshot_lora"}
    control = plan.trainings["fewshot_lora-letters"]
    assert control.baseline and control.target == "letters" and control.sources == () and control.kind == "text"
    assert [r["question"] for r in control.rows] == [e.question for e in plan.tasks["letters"].fewshot]
    evaluated = [(e.task, e.system.name, e.system.built_by) for e in plan.evaluations(built_only=False)
                 if e.system.name == "fewshot_lora"]
    assert evaluated == [("letters", "fewshot_lora", plan.trainings["fewshot_lora-letters"].unit)]
    mixings = plan.mixtures()
    assert [s["method"] for s in mixings["letters.best_expert"].settings] == ["best_expert"]
    other_rows = copy.deepcopy(with_controls)
    other_rows["tasks"][2]["source"]["seed"] = 5  # the unseen task's few-shot rows change
    changed = {p for p, k in keys(plan_of(other_rows, tmp_path)).items() if after[p] != k}
    assert {"baselines/fewshot_lora-letters", "mixtures/letters.uniform", "mixtures/letters.best_expert"} <= changed
    assert not any(p.startswith("experts/") for p in changed)


def test_each_seed_has_its_own_trainings_mixtures_and_evaluations_and_shares_the_teacher(tmp_path):
    """seeds: the first seed keeps the plain paths and the keys a run without seeds has; each other
    seed's trainings, mixtures and evaluations live under seed-<s>/ with keys of their own; the
    teacher's rationales and the base student's evaluations are shared."""
    seeded = copy.deepcopy(CONFIG)
    seeded["seeds"] = [0, 7]
    plan = plan_of(seeded, tmp_path)
    first, other = plan.replicas()
    assert (first.seed, other.seed, first.first, other.first) == (0, 7, True, False)
    assert keys(first) == keys(plan_of(CONFIG, tmp_path))  # seeds [0] is the run without seeds
    assert {n: (u.prefix, u.key) for n, u in other.rationales.items()} == {n: (u.prefix, u.key) for n, u in first.rationales.items()}
    assert other.trainings["coins"].unit.prefix == "seed-7/experts/coins" and other.trainings["coins"].seed == 7
    assert other.trainings["multitask"].unit.prefix == "seed-7/baselines/multitask"
    assert other.trainings["coins"].unit.key != first.trainings["coins"].unit.key
    assert other.mixtures()["letters"].unit.prefix == "seed-7/mixtures/letters"
    evaluations = {(e.task, e.system.name): e for e in other.evaluations(built_only=False)}
    assert ("coins", "base") not in evaluations and evaluations[("coins", "expert")].unit.prefix == "seed-7/eval/coins/expert"
    assert evaluations[("coins", "expert")].seed == 7 and evaluations[("coins", "expert")].label == "coins / expert (seed 7)"
    assert all(e.seed is None for e in first.evaluations(built_only=False))
    with pytest.raises(ConfigError, match="each seed may be given once"):
        parse_config({**seeded, "seeds": [1, 1]})
    assert parse_config(CONFIG).replicate_seeds() == [0] and parse_config({**CONFIG, "seed": 3}).replicate_seeds() == [3]
