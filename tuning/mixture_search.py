"""Stage 3 on Ray Tune: the mixture of experts for every target task.

One Tune trial = one target task and one setting of the mixer (method, budget, bound, L1, top-k),
fitted by :class:`modecotd.mixture_fit.SettingFit` (the method: CV folds, top-k, weight search,
the gate). Inside the trial the whole weight search runs through its optimizer's ask/tell
interface (a Tune trial per weight candidate would cost more in overhead than the objective
itself). The student and the experts are loaded once per Tune worker and reused by every trial it
runs (``reuse_actors``). Each fold's held-out loss is reported as a step, so that a poor setting
can be stopped early (ASHA or median stopping, within its target task). The setting with the
lowest CV loss wins.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

from ray.util.metrics import Counter, Gauge

from modecotd.artifacts import Unit, fingerprint, local_folder, pending, write_json
from modecotd.jobs.placement import wait_for_resources
from modecotd.jobs.progress import send
from modecotd.jobs.ray_runtime import root_cause, stop_if_disk_failed
from modecotd.mixture import Mixture, export_adapter
from modecotd.tracking import tune_callbacks
from modecotd.mixture_fit import ORDER_KEYS, FitOptions, SettingFit, SettingRecord, forward_method, setting_label
from modecotd.models import materialize
from modecotd.outcome import Done, Failed, Outcome
from modecotd.plan import Mixing, RunLayout
from modecotd.units import MixtureFiles, MixtureSummary
from modecotd.tasks.schema import AnswerKind

log = logging.getLogger(__name__)
MAX_TRIAL_FAILURES = 2  # times Tune starts a trial again after its worker died
METRIC = "cv_loss"
RECORD = "record.json"  # in a finished trial's Tune checkpoint, with a gate's routers
STOPPED = "stopped.json"  # in the checkpoint of a trial stopped early, instead


def keep_credentials_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime environment, which
    Ray's runtime-env agent then writes to its log in clear text (and the dashboard shows). Each
    node reads its own credentials instead (see :mod:`modecotd.storage`), so Tune is told not to.

    Tune has no public setting for this: the list is a module attribute of Ray Tune's. Where a Ray
    release has moved it, the search goes on and says so whenever the driver holds AWS keys (the
    test that plants a key and scans Ray's logs, tests/test_pipeline.py, fails on such a release)."""
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = {name for name in names if not name.startswith("AWS_")}
    elif any(name.startswith("AWS_") for name in os.environ):
        log.warning("mix: this Ray release's Tune keeps no ENV_VARS_TO_PROPAGATE list: Tune may copy the AWS_* "
                    "variables of this process into its trials' runtime environment, which Ray's logs show")


@dataclass(frozen=True)
class Cell:
    """One cell of the search's grid, one Tune trial: a target task and one mixer setting. Tune's
    grid holds it as the plain dict ``as_config()`` (Tune takes a dataclass in its grid apart)."""

    task: str
    setting: dict

    def as_config(self) -> dict:
        return {"task": self.task, "setting": self.setting}

    @classmethod
    def of(cls, trial_config: dict) -> "Cell":
        """The cell of a trial's config."""
        return cls(**trial_config["cell"])

    @property
    def key(self) -> tuple[str, str]:
        """(task, setting label): what a scored setting is found by (see :attr:`Scored.key`)."""
        return self.task, setting_label(self.setting)

    @property
    def label(self) -> str:
        return ":".join(self.key)


@dataclass(frozen=True)
class TargetRows:
    kind: str  # the task's AnswerKind
    fewshot: tuple[dict, ...]  # question, answer, rationale


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares, handed to them once (``tune.with_parameters``): the
    student, the experts' units (each trial's node fetches them), the fit's options, the target
    tasks' few-shot rows, and per target task the fingerprint of all of it that its scores depend
    on (a setting scored with the same ``keys`` entry is not scored again)."""

    student: str
    dtype: str
    prompt_format: str
    experts: dict[str, Unit]
    options: FitOptions
    targets: dict[str, TargetRows]
    pooled: dict[str, tuple[dict, ...]]  # every task's few-shot rows with their kind, when a gate pools them
    keys: dict[str, str]

    @classmethod
    def of(cls, config, tasks, targets: list[str], experts: dict[str, Unit], seed: int) -> "TrialContext":
        cfg = config.mixture

        def rows(task) -> tuple[dict, ...]:
            return tuple({"question": ex.question, "answer": ex.answer, "rationale": ex.rationale}
                         for ex in task.fewshot)

        options = FitOptions(optimizer=cfg.optimizer, start=cfg.start, objective=cfg.objective, orders=cfg.orders,
                             candidates_per_forward=cfg.candidates_per_forward, learning_rate=cfg.learning_rate,
                             seed=seed, cv_folds=cfg.cv_folds, max_length=config.distill.max_length,
                             gate_steps=cfg.gate_steps, gate_learning_rate=cfg.gate_learning_rate)
        pooled = ({name: tuple({**row, "kind": task.kind.value} for row in rows(task)) for name, task in tasks.items()}
                  if cfg.gate_rows == "pooled" else {})
        wanted = {name: TargetRows(tasks[name].kind.value, rows(tasks[name])) for name in targets}
        student = config.student
        common = (student.model, student.dtype, student.prompt_format, dataclasses.asdict(options), pooled,
                  {name: unit.key for name, unit in sorted(experts.items())})
        keys = {name: fingerprint(common, dataclasses.asdict(rows)) for name, rows in wanted.items()}
        return cls(student.model, student.dtype, student.prompt_format, experts, options, wanted, pooled, keys)


class MixtureTrial(tune.Trainable):
    """One Tune trial: one mixer setting for one target task, one cross-validation fold per step
    (so that a scheduler can stop a poor setting early), then the fit on every few-shot row, whose
    :class:`SettingRecord` (and a gate's routers) is the trial's checkpoint: Tune keeps it in the
    run's storage and hands it to the driver with the trial's result.

    With ``reuse_actors`` Tune hands the next trial to the same object (:meth:`reset_config`), which
    keeps its loaded student and experts: each Tune worker loads them once."""

    def setup(self, config: dict, context: TrialContext):
        self.context = context
        self.mixture: Mixture | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="modecotd-trial-"))
        self.metrics = {"done": Counter("modecotd_mix_trials_done", "mixer settings scored to the end", ("task",)),
                        "cv_loss": Gauge("modecotd_mix_cv_loss", "CV few-shot loss of the last finished setting",
                                         ("task",))}
        self._start(config)

    def reset_config(self, new_config: dict) -> bool:
        self._start(new_config)
        return True

    def _start(self, config: dict) -> None:
        cell = Cell.of(config)
        self.label = f"{cell.task} / {setting_label(cell.setting)}"
        self.record: SettingRecord | None = None
        self.load_seconds = 0.0  # stays 0 when this worker's student is reused
        context = self.context
        if self.mixture is None:  # the student resolved and the experts fetched on this trial's node
            started = time.time()
            self.mixture = Mixture(materialize(context.student),
                                   {n: local_folder(unit) for n, unit in context.experts.items()},
                                   forward_method(cell.setting["method"]), context.dtype,
                                   prompt_format=context.prompt_format)
            self.load_seconds = time.time() - started
        rows = context.targets[cell.task]
        pooled = [r for name, other in context.pooled.items() if name != cell.task for r in other]
        self.fit = SettingFit(self.mixture, cell.task, list(rows.fewshot), AnswerKind(rows.kind), cell.setting,
                              context.options, pooled, self._counted)
        self.planned = self.fit.evaluations_per_fit * (len(self.fit.folds) + 1)
        self.counted = 0
        self.next_fold = 0

    def _counted(self, count: int) -> None:  # the driver's terminal shows each trial's evaluations as they happen
        self.counted += count
        send("mix", self.label, self.counted, self.planned, "gate step" if self.fit.gate else "evaluation",
             finished=self.counted >= self.planned)

    def step(self) -> dict:
        fit = self.fit
        if self.next_fold < len(fit.folds):
            loss = fit.fold(self.next_fold)
            print(f"mix:{self.label}: fold {self.next_fold + 1} held-out loss {loss:.3f}", flush=True)
            self.next_fold += 1
            return {METRIC: fit.cv_loss, "fold": self.next_fold - 1, "evaluations": fit.evaluations}
        record = fit.final(routers=self.scratch / MixtureFiles.ROUTERS)
        record.worker_pid, record.load_seconds = os.getpid(), self.load_seconds
        record.context_key = self.context.keys[fit.task]
        self.record = record
        self.metrics["done"].inc(1, {"task": fit.task})
        if fit.cv_loss is not None:
            self.metrics["cv_loss"].set(fit.cv_loss, {"task": fit.task})
        final = {"objective": record.objective, "evaluations": fit.evaluations, "done": True}
        return final if fit.cv_loss is None else {METRIC: fit.cv_loss, **final}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """The trial's end: its record, and a gate's routers. Tune takes a checkpoint of a trial its
        scheduler stopped early too: that one says so and holds no record (and is never empty: an
        object store keeps no empty folder to read back)."""
        if self.record is None:
            write_json(Path(checkpoint_dir) / STOPPED, {"stopped_early": True})
            return
        write_json(Path(checkpoint_dir) / RECORD, self.record.to_json())
        if self.fit.gate:
            shutil.copy(self.scratch / MixtureFiles.ROUTERS, Path(checkpoint_dir) / MixtureFiles.ROUTERS)

    def load_checkpoint(self, checkpoint) -> None:
        """Nothing to resume: a trial's only checkpoint is taken when it has ended."""

    def cleanup(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass(frozen=True)
class Scored:
    """A setting a trial fitted to the end: its record, and the checkpoint it came in."""

    record: SettingRecord
    checkpoint: tune.Checkpoint

    @classmethod
    def of(cls, result: tune.Result) -> "Scored | None":
        """The scored setting of a Tune result; None for a trial that failed or was stopped early."""
        if result.error is not None or result.checkpoint is None:
            return None
        with result.checkpoint.as_directory() as folder:
            path = Path(folder) / RECORD
            if not path.is_file():
                return None
            return cls(SettingRecord.from_json(json.loads(path.read_text())), result.checkpoint)

    @property
    def key(self) -> tuple[str, str]:
        """Its cell's :attr:`Cell.key`."""
        return self.record.task, self.record.setting


class PerTaskScheduler(FIFOScheduler):
    """Early stopping that compares a trial only with trials of the same target task (their loss
    scales differ): one ASHA or median-stopping scheduler per task. A trial is stopped or goes on,
    never paused: it keeps no checkpoint, so a paused trial would start again from nothing."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.schedulers: dict[str, object] = {}

    def _of(self, trial):
        task = Cell.of(trial.config).task
        if task not in self.schedulers:
            self.schedulers[task] = self.make()
        return self.schedulers[task]

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        decision = self._of(trial).on_trial_result(tune_controller, trial, result)
        return self.CONTINUE if decision == self.PAUSE else decision

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self._of(trial).on_trial_error(tune_controller, trial)


def make_scheduler(kind: str, cv_folds: int):
    if kind == "none" or not cv_folds:  # without folds there is nothing to stop early on
        return FIFOScheduler()
    if kind == "asha":
        return PerTaskScheduler(lambda: AsyncHyperBandScheduler(
            time_attr="training_iteration", metric=METRIC, mode="min", max_t=cv_folds + 1, grace_period=1,
            reduction_factor=2))
    return PerTaskScheduler(lambda: MedianStoppingRule(
        time_attr="training_iteration", metric=METRIC, mode="min", grace_period=1, min_samples_required=2))


class TrialProgress(tune.Callback):
    """Per target task on the driver's terminal: mixer settings scored, objective evaluations so far
    and the best CV loss."""

    def __init__(self, settings_per_task: dict[str, int]):
        self.totals = settings_per_task
        self.trials: dict[str, dict[str, dict]] = {}  # task -> trial id -> its last result

    def _send(self, task: str) -> None:
        trials = self.trials[task]
        finished = sum(r.get("ended", False) for r in trials.values())
        evaluations = sum(r.get("evaluations", 0) for r in trials.values())
        losses = [r[METRIC] for r in trials.values() if METRIC in r]
        best = f", best CV loss {min(losses):.3f}" if losses else ""
        send("mix", task, finished, self.totals[task], "setting", note=f"{evaluations} evaluations{best}",
             finished=finished >= self.totals[task])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        task = Cell.of(trial.config).task
        self.trials.setdefault(task, {})[trial.trial_id] = {**result, "ended": False}
        self._send(task)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def _ended(self, trial) -> None:
        task = Cell.of(trial.config).task
        self.trials.setdefault(task, {}).setdefault(trial.trial_id, {})["ended"] = True
        self._send(task)


def earlier_results(storage, ray_folder: str, prefix: str, trainable) -> list[tune.Result]:
    """The trials' results of this run's earlier searches named ``prefix``..., read back through Tune
    (a search a crash cut short included, as far as Tune saved its state); a search folder Tune
    cannot read back holds nothing to keep and is deleted."""
    results = []
    for name in sorted({path.split("/", 1)[0] for path in storage.files(ray_folder) if path.startswith(prefix)}):
        path = storage.path(f"{ray_folder}/{name}")
        if not tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
            storage.delete(f"{ray_folder}/{name}")
            continue
        try:
            results += tune.Tuner.restore(path, trainable, storage_filesystem=storage.filesystem).get_results()
        except Exception as error:  # e.g. written by a release whose Tune state this one cannot read
            log.warning("mix: the earlier search %s could not be read back (%s): its settings are scored again",
                        name, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
    return results


def run_mixture_stage(config, layout: RunLayout, tasks, mixings: dict[str, Mixing], experts: dict[str, Unit],
                      seed: int | None = None) -> dict[str, Outcome]:
    """Search the mixtures not done yet (one per target task, or one per method and task) with
    ``seed`` (default: the config's); commit each one's best setting. A setting is tried once per
    task, whichever mixtures choose from it, and not again when an earlier search of the run (one a
    crash cut short, say) scored it with the same inputs."""
    seed = config.seed if seed is None else seed
    todo = [mixings[label] for label in pending({label: m.unit for label, m in mixings.items()}, "mix", log)]
    if not todo:
        return {}
    if not experts:
        return {m.label: Failed("no expert was trained") for m in todo}

    cfg = config.mixture
    wait_for_resources({"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}, "a mixer trial",
                       config.resources.placement_timeout_s, "mixture.cpus_per_trial / gpus_per_trial")
    storage = layout.storage
    cells = _cells(todo)
    targets = sorted({cell.task for cell in cells})
    context = TrialContext.of(config, tasks, targets, experts, seed)
    trainable = tune.with_resources(tune.with_parameters(MixtureTrial, context=context),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    searches = f"mix-{seed}-"
    scored = {s.key: s for s in map(Scored.of, earlier_results(storage, layout.ray, searches, trainable))
              if s is not None and s.record.context_key == context.keys.get(s.record.task)}
    cells = [cell for cell in cells if cell.key not in scored]
    if scored:
        log.info("mix: %d setting(s) scored before with the same inputs are kept; %d to score", len(scored), len(cells))
    started = time.time()
    errors: dict[str, str] = {}
    if cells:
        experiment = f"{searches}{int(time.time())}-{config.name}"  # the run's name, for the dashboard
        results, errors = _search(cells, config, trainable, storage, layout.ray, experiment)
        scored |= {s.key: s for s in map(Scored.of, results) if s is not None}
    outcomes: dict[str, Outcome] = {}
    for mixing in todo:
        keys = [Cell(mixing.task, s).key for s in mixing.settings]
        mine = [scored[key] for key in keys if key in scored]
        if not mine:
            outcomes[mixing.label] = Failed(errors.get(mixing.task, "no trial finished"))
            log.error("mix: %s failed: %s", mixing.label, outcomes[mixing.label].reason)
            continue
        outcomes[mixing.label] = Done(_commit(mixing, mine, experts, cfg))
    log.info("mix stage took %.1f s", time.time() - started)
    return outcomes


def _search(cells: list[Cell], config, trainable, storage, ray_folder: str, experiment: str
            ) -> tuple[list[tune.Result], dict[str, str]]:
    """One Tune experiment over ``cells``: every trial's result, and the error of a failed trial by
    target task."""
    cfg = config.mixture
    per_task = {name: sum(cell.task == name for cell in cells) for name in {cell.task for cell in cells}}
    callbacks = tune_callbacks(config.tracking.model_dump(mode="json"), config.name) + [TrialProgress(per_task)]
    keep_credentials_out_of_trials()
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([cell.as_config() for cell in cells])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True,
                                    scheduler=make_scheduler(cfg.scheduler, cfg.cv_folds),
                                    trial_name_creator=lambda t: f"mix:{Cell.of(t.config).label}",
                                    trial_dirname_creator=lambda t: f"{Cell.of(t.config).task}-{t.trial_id}"),
        run_config=tune.RunConfig(name=experiment, storage_path=storage.path(ray_folder),
                                  storage_filesystem=storage.filesystem,
                                  verbose=0, callbacks=callbacks,
                                  # a trial whose worker dies starts again (from nothing: it is deterministic)
                                  failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES),
                                  # a trial's record is its one checkpoint, taken at its end (see MixtureTrial)
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True)),
    )
    results = list(tuner.fit())
    errors: dict[str, str] = {}
    for result in results:
        if result.error:
            task = _trial_task(result)
            errors[task] = str(result.error).splitlines()[0][:300]
            stop_if_disk_failed(root_cause(result.error), f"mix {task}")
    return results, errors


def _trial_task(result) -> str:
    """The target task of a Tune result; a trial that failed before it reported has no config, but
    its folder is named ``<task>-<trial id>`` (see ``trial_dirname_creator``)."""
    config = result.config or {}
    if "cell" in config:
        return Cell.of(config).task
    return Path(str(result.path or "unknown-trial")).name.rsplit("-", 1)[0]


def _cells(mixings: list[Mixing]) -> list[Cell]:
    """One Tune trial per (target task, setting) that a pending mixture chooses from."""
    cells = {cell.key: cell for cell in (Cell(m.task, s) for m in mixings for s in m.settings)}
    return list(cells.values())


TIE_TOLERANCE = 1e-6  # relative: scores this close are equal (float sums differ in the last bits by trial order)


def best_record(records: list[SettingRecord], order: list[str]) -> SettingRecord:
    """The record with the lowest CV loss (the objective without folds). Settings that score the
    same within :data:`TIE_TOLERANCE` (one expert mixed by every method, say) are a tie, won by the
    setting listed first in ``order`` (the config's): never by which trial happened to finish
    first or on which worker, which would change the choice between two runs of one config."""
    lowest = min(r.score for r in records)
    tied = [r for r in records if r.score <= lowest + TIE_TOLERANCE * max(1.0, abs(lowest))]
    rank = {key: i for i, key in enumerate(order)}
    return min(tied, key=lambda r: (rank.get(r.setting, len(rank)), r.setting))


def _commit(mixing: Mixing, scored: list[Scored], experts: dict[str, Unit], cfg) -> MixtureSummary:
    """Keep the best setting's mixture: its weights, the merged adapter (a gate's routers), and every
    trial's search."""
    unit = mixing.unit
    records = sorted((s.record for s in scored), key=lambda r: r.setting)
    best = best_record(records, [setting_label(s) for s in mixing.settings])
    summary = MixtureSummary(
        **{k: getattr(best, k) for k in ("method", "budget", "bound", "l1", "top_k", "setting", "cv_loss", "objective",
                                         "weights", "experts_mixed", "zero_weights_loss", "precision", *ORDER_KEYS,
                                         "control")},
        candidates=[{"setting": r.setting, "cv_loss": r.cv_loss} for r in records], system=mixing.system,
        settings_tried=len(mixing.settings))
    with unit.writing(summary.to_json()) as staging:
        write_json(staging / MixtureFiles.SUMMARY, {**summary.to_json(), "optimizer": cfg.optimizer,
                                                    "experts": {n: e.prefix for n, e in experts.items()}})
        write_json(staging / MixtureFiles.SEARCH, {"trials": [r.to_json() for r in records]})
        if best.method == "gate":  # per-token weights: the routers are the mixture
            checkpoint = next(s.checkpoint for s in scored if s.record is best)
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / MixtureFiles.ROUTERS, staging / MixtureFiles.ROUTERS)
        else:
            export_adapter({n: local_folder(e) for n, e in experts.items()}, best.method,
                           [best.weights[n] for n in experts], staging / MixtureFiles.ADAPTER)
    log.info("mix: %s: %s, cv loss %s, weights %s", mixing.label, best.setting,
             "–" if best.cv_loss is None else f"{best.cv_loss:.3f}",
             {k: round(v, 2) for k, v in best.weights.items()})
    return summary
