"""The Ray driver: config -> plan -> four stages -> report, skipping every unit already done
(what each stage makes and how it is fingerprinted: :mod:`modecotd.plan`)."""
from __future__ import annotations

import json
import logging
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modecotd.artifacts import clean_staging
from modecotd.config import STAGES, RunConfig
from modecotd.config_loading import check_data_paths
from modecotd.errors import UserError
from modecotd.jobs.run_log import RunLog
from modecotd.outcome import Failed
from modecotd.tracking import check_installed, prepare as prepare_tracking, track_results
from modecotd.models import check_reference, context_limit
from modecotd.prompts import check_chat_template, rendered_prompt
from modecotd.plan import Plan, RunLayout, check_run_stamp, plan_json, write_run_stamp
from modecotd.precision import resolve_dtype
from modecotd.progress import ProgressBoard
from modecotd.report import build_report, task_facts
from modecotd.storage import Storage
from modecotd.tasks import build
from modecotd.tasks.schema import TaskData

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    storage: Storage  # the run's
    report: str | None  # where report.md is (a path, or a URI in an object store)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Work:
    """What the stages run on: the plan and the tasks' data (every worker resolves the models it
    needs on its own node)."""

    config: RunConfig
    tasks: dict[str, TaskData]
    plan: Plan


def load_tasks(config) -> dict[str, TaskData]:
    """Every task's data, each path and row checked; an error about a task names its config key."""
    check_data_paths(config)
    return build.load_tasks(config.tasks, locate=lambda index: config.where("tasks", index))


def run_pipeline(config, run_dir: str | Path | None = None, address: str | None = None,
                 stages: list[str] | None = None, progress: ProgressBoard | None = None,
                 take_over: bool = False, allow_plain_token: bool = False) -> RunOutcome:
    """Run the four stages on Ray (or only ``stages``, on the artifacts the earlier stages left in
    the run's storage: ``run_dir``, a folder or a URI, by default ``<config.storage>/<name>``);
    returns where the report is and what failed. Progress goes to ``progress`` (default: a board on
    standard error). The run's lease (:mod:`modecotd.lease`) is held throughout: a second driver on
    the same run is refused, unless ``take_over``. ``allow_plain_token``: the CLI's
    --allow-http-token (see :func:`modecotd.cluster.auth.check_token_over_grpc`)."""
    from modecotd.jobs.ray_runtime import check_address
    from modecotd.lease import RunLease

    work = _prepare(config, run_dir, stages)  # bad input fails here, before anything is written or started
    _check_earlier_stages(work, stages)
    check_address(address, allow_plain_token)
    with RunLease(work.plan.layout.storage, take_over) as lease, \
            RunLog(work.plan.layout.storage, config.name) as run_log:
        return _run_held(work, (address, allow_plain_token), stages, progress, lease, run_log)


def _run_held(work: Work, cluster: tuple[str | None, bool], stages: list[str] | None,
              progress: ProgressBoard | None, lease, run_log: RunLog) -> RunOutcome:
    from modecotd.jobs import ray_runtime
    from modecotd.jobs.progress import progress_display

    layout = work.plan.layout
    work = _connect(work, *cluster, run_log)
    _start_run_folder(layout, work.config, work.tasks)
    prepare_tracking(work.config.tracking.model_dump(mode="json"), work.config.name)
    outcome = RunOutcome(storage=layout.storage, report=None)
    try:
        with progress_display(progress):
            for name in STAGES:
                _run_stage(name, work, stages, outcome)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping every job and actor of this run; finished units are kept and the same "
                    "command resumes the run")
        ray_runtime.shutdown()
        if lease.lost:
            raise UserError(lease.lost) from None
        raise
    storage = layout.storage
    timings = json.loads(storage.read_text(layout.timings)) if storage.exists(layout.timings) else {}
    # a run of some stages keeps the others' times
    storage.write_text(layout.timings, json.dumps({**timings, **outcome.seconds}, indent=2, sort_keys=True))
    write_plan(work)
    outcome.report = build_report(storage)
    track_results(work.config.tracking.model_dump(mode="json"), work.config.name, storage)
    return outcome


def _prepare(config, run_dir, stages: list[str] | None) -> Work:
    """The run's plan, its tasks' data and its storage, each checked."""
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    layout = RunLayout(Storage(run_dir or config.run_location()))
    tasks = load_tasks(config)
    check_run_stamp(layout)
    check_inputs(config, tasks, stages)
    if not layout.storage.is_local:  # an object store that cannot be reached fails before Ray starts
        layout.storage.check_reachable()
    else:
        check_writable(layout.storage.local_root)
    return Work(config, tasks, Plan(config, tasks, layout))


def check_inputs(config, tasks: dict[str, TaskData], stages: list[str] | None = None) -> None:
    """What a run refuses before it starts anything, apart from its run folder (``modecotd check``
    runs this too): a model that no node could resolve, a question too long for the student, a
    teacher endpoint's API key variable that is not set (when the teacher stage runs), a tracker
    whose library is not installed."""
    check_installed(config.tracking.model_dump(mode="json"))
    models = [("student", config.student.model)] + ([("teacher", config.teacher.model)]
                                                    if config.teacher.loads_model else [])
    for section, model in models:
        try:
            check_reference(model)  # a model that no node could resolve
        except UserError as error:
            raise type(error)(f"{config.where(section, 'model')}: {error}") from None
    check_context(config, tasks)
    if config.teacher.backend == "openai" and (not stages or "teacher" in stages):
        from modecotd.backends.openai_api import resolve_api_key

        resolve_api_key(config.teacher.endpoint.api_key_env)  # that the variable is set; its value stays there


def check_writable(folder: Path) -> None:
    """The run folder (or, before it exists, the folder it will be made in) can be written, checked
    before Ray starts: a read-only mount would otherwise fail the run at its first write."""
    import os

    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise UserError(f"{existing}: cannot write the run there: "
                        f"{'read-only file system' if read_only else 'no write permission'}")


def check_context(config, tasks: dict[str, TaskData]) -> None:
    """Every test and few-shot question fits the student's context with room for its answer (a
    longer one could never be answered, and would make evaluation allocate without bound)."""
    limit = context_limit(config.student.model)
    if limit is None:
        return
    count_tokens, context = limit
    answer = config.evaluation.max_new_tokens
    room = context - answer
    if room <= 0:
        raise UserError(f"{config.where('evaluation', 'max_new_tokens')}: {answer} tokens, but the student's "
                        f"context is {context} tokens")
    fmt, tokenizer = config.student.prompt_format, None
    if fmt == "chat":  # the student is at hand on this node (context_limit found it): its template too
        from modecotd.models import load_tokenizer, materialize

        tokenizer = load_tokenizer(materialize(config.student.model))
        check_chat_template(tokenizer, config.where("student", "prompt_format"))
    for data in tasks.values():
        examples = data.test + data.fewshot
        lengths = count_tokens([rendered_prompt(ex.question, data.kind, fmt, tokenizer) for ex in examples])
        for ex, length in zip(examples, lengths):
            if length > room:
                raise UserError(f"{ex.source}: the question is {length} tokens in the student's prompt; the "
                                f"student's context ({context} tokens) leaves {room} once "
                                f"evaluation.max_new_tokens ({answer}) are kept for the answer")


def _connect(work: Work, address: str | None, allow_plain_token: bool, run_log: RunLog | None = None) -> Work:
    """Start or join Ray, the workers' lines going to the run's log; check that every node reaches
    the storage. Returns the work the stages run on: on a cluster this run started, with no wait
    for nodes to join (none will)."""
    from modecotd.jobs import ray_runtime
    from modecotd.jobs.storage_check import check_every_node_reaches

    config = work.config
    cluster = ray_runtime.connect(address, config.resources.num_cpus, config.resources.dashboard,
                                  config.resources.dashboard_host, run=config.name, run_log=run_log,
                                  allow_plain_token=allow_plain_token)
    check_every_node_reaches(work.plan.layout.storage)
    if cluster.get("started_here"):  # no node will join a cluster this run started: never wait for one
        resources = config.resources.model_copy(update={"placement_timeout_s": 0})
        config = config.model_copy(update={"resources": resources})
        work = dataclasses.replace(work, config=config)
    log.info("run %s in %s (Ray dashboard: %s)", config.name, work.plan.layout.storage.describe(),
             cluster.get("dashboard"))
    log.info("student dtype %s on this node's CPU; each worker decides for its own device and the report "
             "says what was used", resolve_dtype(config.student.dtype, "cpu").describe())
    return work


def _start_run_folder(layout: RunLayout, config, tasks: dict[str, TaskData]) -> None:
    storage = layout.storage
    clean_staging(storage)
    write_run_stamp(layout)
    storage.write_text(layout.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    storage.write_text(layout.tasks, json.dumps(task_facts(tasks), indent=2, sort_keys=True))


def write_plan(work: Work) -> None:
    """Record every unit the run plans (:meth:`Plan.planned_units`) in the run's storage."""
    layout = work.plan.layout
    layout.storage.write_text(layout.plan, plan_json(work.plan.planned_units()))


def _check_earlier_stages(work: Work, stages: list[str] | None) -> None:
    """With only some stages asked for, every stage before the last one asked for and not itself
    asked for must have left its units in the run's storage (checked before anything is written)."""
    if not stages:
        return
    last = max(STAGES.index(s) for s in stages)
    for name in STAGES[:last]:
        if name in stages:
            continue
        missing = [(u.prefix, u.problem()) for replica in work.plan.replicas() for u in replica.units(name)]
        missing = [f"{prefix} ({problem})" for prefix, problem in missing if problem is not None]
        if missing:
            raise UserError(f"--stage {','.join(stages)} needs the {name} stage's outputs, and "
                            f"{work.plan.layout.storage.describe()} lacks {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}: run that stage first")


def _run_stage(name: str, work: Work, stages: list[str] | None, outcome: RunOutcome) -> None:
    """Run stage ``name`` unless only other stages were asked for."""
    if stages and name not in stages:
        return
    write_plan(work)  # a stage's wanted units are known once the stages before it are done
    started = time.time()
    results = STAGE_RUNNERS[name](work) or {}
    outcome.seconds[name] = time.time() - started
    for unit, result in results.items():
        if isinstance(result, Failed):
            outcome.failures[f"{name}:{unit}"] = result.reason


def _teacher(work: Work) -> dict:
    from modecotd.jobs.teacher_stage import run_teacher_stage

    return run_teacher_stage(work.config, work.plan.layout, work.tasks, work.plan.rationales)


def _seeded(name: str, plan: Plan) -> str:
    """A unit's name in logs and results: with its seed when it is not the run's first."""
    return name if plan.first else f"{name}@seed{plan.seed}"


def _distill(work: Work) -> dict:
    from modecotd.jobs.distill_stage import run_distill_stage

    trainings = {_seeded(name, plan): training for plan in work.plan.replicas()  # every seed's jobs side by side
                 for name, training in plan.trainings.items()}
    return run_distill_stage(work.config, work.plan.layout, trainings)


def _mix(work: Work) -> dict:
    from modecotd.tuning.mixture_search import run_mixture_stage

    results = {}
    for plan in work.plan.replicas():  # one Tune experiment per seed, on that seed's experts
        found = run_mixture_stage(work.config, plan.layout, work.tasks, plan.mixtures(), plan.trained_experts(),
                                  seed=plan.seed)
        results.update({_seeded(label, plan): result for label, result in found.items()})
    return results


def _evaluate(work: Work) -> dict:
    from modecotd.jobs.evaluate_stage import run_evaluate_stage

    return run_evaluate_stage(work.config, work.tasks, [e for plan in work.plan.replicas() for e in plan.evaluations()])


STAGE_RUNNERS = {"teacher": _teacher, "distill": _distill, "mix": _mix, "evaluate": _evaluate}
