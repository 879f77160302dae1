"""The Ray driver: config -> four stages -> report, skipping every unit already done.

Fingerprints chain from stage to stage (an expert's key includes its rationales' key, a
mixture's the experts' keys, an evaluation the system's key), so a change anywhere redoes exactly
what depends on it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modecotd.artifacts import Unit, clean_staging, fingerprint, write_json
from modecotd.config import STAGES
from modecotd.errors import UserError
from modecotd.models import materialize
from modecotd.precision import resolve_dtype
from modecotd.progress import ProgressBoard
from modecotd.report import TASKS_FILE, build_report, task_facts
from modecotd.tasks.build import load_task
from modecotd.tasks.schema import Example, TaskData

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1
BASELINE_KEYS = {"baselines", "full_finetune_task", "full_finetune_learning_rate"}
# Settings that change where or how fast work runs, never what it produces.
RESOURCE_KEYS = {"actors", "cpus_per_actor", "gpus_per_actor", "max_restarts", "max_failures", "workers_per_job",
                 "gpus_per_worker", "use_gpu", "cpus_per_worker", "max_concurrent_jobs", "cpus_per_trial",
                 "gpus_per_trial", "max_concurrent_trials", "concurrency", "timeout_s", "max_retries", "backoff_s",
                 "api_key_env", "mlflow_tracking_uri", "tensor_parallel_size", "gpu_memory_utilization",
                 "gradient_checkpointing"}


@dataclass
class RunOutcome:
    run_dir: Path
    report: Path | None
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _settings(section) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RESOURCE_KEYS}
        return value

    return strip(section.model_dump(mode="json"))


def _examples_key(examples: list[Example]) -> str:
    return fingerprint([(e.question, e.answer, e.rationale) for e in examples])


def load_tasks(config) -> dict[str, TaskData]:
    return {task.name: load_task(task) for task in config.tasks}


def run_pipeline(config, run_dir: Path, address: str | None = None, stages: list[str] | None = None,
                 progress: ProgressBoard | None = None) -> RunOutcome:
    """Run the four stages on Ray (or only ``stages``, on the artifacts the earlier stages left in
    ``run_dir``); returns where the report is and what failed. Progress goes to ``progress``
    (default: a board on standard error)."""
    from modecotd.jobs import ray_runtime
    from modecotd.jobs.progress import progress_display

    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:  # before anything is loaded, written or started
        raise UserError(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    run_dir = Path(run_dir).resolve()
    tasks = load_tasks(config)  # bad data fails here, before anything is written
    student_dir = materialize(config.student.model)
    teacher_dir = materialize(config.teacher.model) if config.teacher.backend in ("transformers", "vllm") else None
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_staging(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    write_json(run_dir / TASKS_FILE, task_facts(tasks))
    outcome = RunOutcome(run_dir=run_dir, report=None)
    cluster = ray_runtime.connect(address, config.resources.num_cpus, config.resources.dashboard)
    log.info("run %s in %s (Ray dashboard: %s)", config.name, run_dir, cluster.get("dashboard"))
    precision = resolve_dtype(config.student.dtype, "cpu")
    log.info("student dtype %s on this node's CPU; each worker decides for its own device and the report "
             "says what was used", precision.describe())
    try:
        with progress_display(progress):
            _run_stages(config, run_dir, tasks, student_dir, teacher_dir, stages, outcome)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every job and actor of this run; finished units are kept and the same "
                    "command resumes the run")
        ray_runtime.shutdown()
        raise
    timings = run_dir / "timings.json"  # a run of some stages keeps the others' times
    write_json(timings, {**(json.loads(timings.read_text()) if timings.is_file() else {}), **outcome.seconds})
    outcome.report = build_report(run_dir)
    return outcome


def _run_stages(config, run_dir: Path, tasks: dict[str, TaskData], student_dir: Path, teacher_dir: Path | None,
                stages: list[str] | None, outcome: RunOutcome) -> None:
    from modecotd.jobs.distill_stage import ExpertJob, run_distill_stage
    from modecotd.jobs.evaluate_stage import run_evaluate_stage
    from modecotd.jobs.teacher_stage import run_teacher_stage
    from modecotd.tuning.mixture_search import run_mixture_stage

    last = max(STAGES.index(name) for name in stages) if stages else len(STAGES) - 1

    def stage(name: str, units, run) -> dict:
        """Run stage ``name``; when only other stages were asked for, check instead that an earlier
        stage's units are done (a later one is left alone)."""
        if stages and name not in stages:
            missing = [str(u.path.relative_to(run_dir)) for u in units if not u.done()]
            if STAGES.index(name) < last and missing:
                raise UserError(f"--stage {','.join(stages)} needs the {name} stage's outputs, and {run_dir} lacks "
                                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: run that stage first")
            return {}
        started = time.time()
        results = run() or {}
        outcome.seconds[name] = time.time() - started
        for unit, result in results.items():
            if isinstance(result, dict) and result.get("status") == "failed":
                outcome.failures[f"{name}:{unit}"] = result["error"]
        return results

    seen = [t.name for t in config.seen_tasks]
    common = {"version": PIPELINE_VERSION, "seed": config.seed}
    teacher_keys = {name: fingerprint(common, _settings(config.teacher), tasks[name].train.key,
                                      tasks[name].kind.value, config.task(name).teacher_template,
                                      _examples_key(tasks[name].fewshot) if config.teacher.prompting == "few_shot"
                                      else None) for name in seen}
    teacher_units = {name: Unit(run_dir / "rationales" / name, key) for name, key in teacher_keys.items()}
    stage("teacher", teacher_units.values(),
          lambda: run_teacher_stage(config, run_dir, tasks, teacher_units, teacher_dir))

    # Adding a baseline must not retrain the experts: its settings stay out of their keys.
    distill_settings = {k: v for k, v in _settings(config.distill).items() if k not in BASELINE_KEYS}
    distill_common = (common, distill_settings, config.student.model_dump(mode="json"))
    expert_units = {name: Unit(run_dir / "experts" / name, fingerprint(*distill_common, teacher_keys[name]))
                    for name in seen}
    jobs = {name: ExpertJob(unit, [(teacher_units[name].path, tasks[name].kind.value)])
            for name, unit in expert_units.items()}
    baseline_units = {}
    if "multitask" in config.distill.baselines:
        baseline_units["multitask"] = Unit(run_dir / "baselines" / "multitask",
                                           fingerprint(*distill_common, "multitask", sorted(teacher_keys.items())))
        jobs["multitask"] = ExpertJob(baseline_units["multitask"],
                                      [(teacher_units[n].path, tasks[n].kind.value) for n in seen])
    if "full_finetune" in config.distill.baselines:
        task = config.distill.full_finetune_task or seen[0]
        baseline_units["full_finetune"] = Unit(run_dir / "baselines" / "full_finetune",
                                               fingerprint(*distill_common, "full_finetune", teacher_keys[task],
                                                           config.distill.full_finetune_learning_rate))
        jobs["full_finetune"] = ExpertJob(baseline_units["full_finetune"],
                                          [(teacher_units[task].path, tasks[task].kind.value)], full_finetune=True)
    stage("distill", [job.unit for job in jobs.values()], lambda: run_distill_stage(config, run_dir, jobs, student_dir))
    experts = {name: unit for name, unit in expert_units.items() if unit.done()}

    targets = [t.name for t in config.tasks]
    experts_key = fingerprint(sorted((n, u.key) for n, u in experts.items()))
    mixture_units = {name: Unit(run_dir / "mixtures" / name,
                                fingerprint(common, experts_key, _settings(config.mixture),
                                            _examples_key(tasks[name].fewshot), config.distill.max_length))
                     for name in targets}
    stage("mix", mixture_units.values(), lambda: run_mixture_stage(
        config, run_dir, tasks, mixture_units, {n: u.path for n, u in experts.items()}, student_dir))

    jobs = []
    eval_settings = _settings(config.evaluation)
    for name in targets:
        test_key = _examples_key(tasks[name].test)
        systems = {"base": ({"kind": "base"}, config.student.model)}
        if name in experts:
            systems["expert"] = ({"kind": "expert", "adapter": str(experts[name].path)}, experts[name].key)
        mixture = mixture_units[name].manifest() if mixture_units[name].done() else None
        if mixture:
            summary = mixture["summary"]
            system = {"kind": "mixture", "method": summary["method"], "weights": summary["weights"],
                      "experts": {n: str(experts[n].path) for n in summary["weights"]}}
            if summary["method"] == "gate":
                system["routers"] = str(mixture_units[name].path / "routers.safetensors")
            systems["mixture"] = (system, mixture_units[name].key)
        for baseline, unit in baseline_units.items():
            if unit.done():
                system = ({"kind": "expert", "adapter": str(unit.path)} if baseline == "multitask"
                          else {"kind": "full", "model": str(unit.path)})
                systems[baseline] = (system, unit.key)
        for system_name, (system, key) in systems.items():
            unit = Unit(run_dir / "eval" / name / system_name,
                        fingerprint(common, key, test_key, eval_settings, config.student.model_dump(mode="json")))
            jobs.append((name, system_name, system, unit))
    stage("evaluate", [job[3] for job in jobs], lambda: run_evaluate_stage(config, tasks, jobs, student_dir))
