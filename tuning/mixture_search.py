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

import json
import logging
import os
import tempfile
import time
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
from modecotd.mixture_fit import ORDER_KEYS, FitOptions, SettingFit, forward_method, setting_label
from modecotd.models import materialize
from modecotd.outcome import Done, Failed, Outcome
from modecotd.plan import Mixing, MixtureFiles, RunLayout
from modecotd.tasks.schema import AnswerKind

log = logging.getLogger(__name__)
MAX_TRIAL_FAILURES = 2  # times Tune starts a trial again after its worker died


def keep_credentials_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime environment, which
    Ray's runtime-env agent then writes to its log in clear text (and the dashboard shows). Each
    node reads its own credentials instead (see :mod:`modecotd.storage`), so Tune is told not to."""
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(names, (set, frozenset)):
        class_cache.ENV_VARS_TO_PROPAGATE = {name for name in names if not name.startswith("AWS_")}
METRIC = "cv_loss"


class MixtureTrial(tune.Trainable):
    """One Tune trial: one mixer setting for one target task, one cross-validation fold per step
    (so that a scheduler can stop a poor setting early), then the fit on every few-shot row.

    With ``reuse_actors`` Tune hands the next trial to the same object (:meth:`reset_config`), which
    keeps its loaded student and experts: each Tune worker loads them once."""

    def setup(self, config: dict, context: dict):
        self.context = context
        self.options = FitOptions(**{k: context[k] for k in FitOptions.__dataclass_fields__})
        self.mixture: Mixture | None = None
        self.metrics = {"done": Counter("modecotd_mix_trials_done", "mixer settings scored to the end", ("task",)),
                        "cv_loss": Gauge("modecotd_mix_cv_loss", "CV few-shot loss of the last finished setting",
                                         ("task",))}
        self._start(config)

    def reset_config(self, new_config: dict) -> bool:
        self._start(new_config)
        return True

    def _start(self, config: dict) -> None:
        task, setting = config["job"]["task"], config["job"]["setting"]
        self.label = f"{task} / {setting_label(setting)}"
        self.load_seconds = 0.0  # stays 0 when this worker's student is reused
        if self.mixture is None:  # the student resolved and the experts fetched on this trial's node
            started = time.time()
            self.mixture = Mixture(materialize(self.context["student"]),
                                   {n: local_folder(unit) for n, unit in self.context["experts"].items()},
                                   forward_method(setting["method"]), self.context["dtype"],
                                   prompt_format=self.context["prompt_format"])
            self.load_seconds = time.time() - started
        spec = self.context["tasks"][task]
        pooled = [r for name, other in self.context["pooled"].items() if name != task for r in other]
        self.fit = SettingFit(self.mixture, task, spec["fewshot"], AnswerKind(spec["kind"]), setting, self.options,
                              pooled, self._counted)
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
        storage, trials = self.context["storage"], f"{self.context['trials']}/{fit.task}"
        with tempfile.TemporaryDirectory() as scratch:
            record = fit.final(routers=Path(scratch) / MixtureFiles.ROUTERS)
            if fit.gate:  # the driver reads them from storage, wherever this trial ran
                routers = f"{trials}/{setting_label(fit.setting)}.{MixtureFiles.ROUTERS}"
                storage.upload(Path(record["routers"]), routers)
                record["routers"] = routers
        record.update(worker_pid=os.getpid(), load_seconds=self.load_seconds,
                      context_key=self.context["keys"][fit.task])
        storage.write_text(f"{trials}/{setting_label(fit.setting)}.json", json.dumps(record, default=str))
        self.metrics["done"].inc(1, {"task": fit.task})
        if fit.cv_loss is not None:
            self.metrics["cv_loss"].set(fit.cv_loss, {"task": fit.task})
        final = {"objective": record["objective"], "evaluations": fit.evaluations, "done": True}
        return final if fit.cv_loss is None else {METRIC: fit.cv_loss, **final}


class PerTaskScheduler(FIFOScheduler):
    """Early stopping that compares a trial only with trials of the same target task (their loss
    scales differ): one ASHA or median-stopping scheduler per task. A trial is stopped or goes on,
    never paused: it keeps no checkpoint, so a paused trial would start again from nothing."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.schedulers: dict[str, object] = {}

    def _of(self, trial):
        task = trial.config["job"]["task"]
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
        task = trial.config["job"]["task"]
        self.trials.setdefault(task, {})[trial.trial_id] = {**result, "ended": False}
        self._send(task)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def _ended(self, trial) -> None:
        task = trial.config["job"]["task"]
        self.trials.setdefault(task, {}).setdefault(trial.trial_id, {})["ended"] = True
        self._send(task)


def trial_context(config, tasks, todo: list[str], experts: dict[str, Unit], storage, trials: str, seed: int) -> dict:
    """What every trial gets: where the student, the experts and the storage are, the mixer's
    settings, the seed and each target task's few-shot rows."""
    cfg = config.mixture
    return {
        "student": config.student.model, "dtype": config.student.dtype,
        "prompt_format": config.student.prompt_format, "experts": experts, "optimizer": cfg.optimizer,
        "start": cfg.start, "objective": cfg.objective,
        "orders": cfg.orders,
        "candidates_per_forward": cfg.candidates_per_forward, "learning_rate": cfg.learning_rate,
        "seed": seed, "cv_folds": cfg.cv_folds, "max_length": config.distill.max_length,
        "storage": storage, "trials": trials, "gate_steps": cfg.gate_steps, "gate_learning_rate": cfg.gate_learning_rate,
        "pooled": ({name: [{"question": ex.question, "answer": ex.answer, "rationale": ex.rationale,
                            "kind": task.kind.value} for ex in task.fewshot] for name, task in tasks.items()}
                   if cfg.gate_rows == "pooled" else {}),
        "tasks": {name: {"kind": tasks[name].kind.value,
                         "fewshot": [{"question": ex.question, "answer": ex.answer, "rationale": ex.rationale}
                                     for ex in tasks[name].fewshot]} for name in todo},
    }


FINISHED_MARK = ".finished"  # in a Tune experiment's folder once its search has ended


def trial_keys(context: dict, targets: list[str]) -> dict[str, str]:
    """Per target task, a fingerprint of everything its trials' scores depend on besides the
    setting (the student, the experts' units, the search options, the seed, the task's rows)."""
    common = {k: v for k, v in context.items() if k not in ("storage", "trials", "tasks", "experts", "keys")}
    common["experts"] = {name: unit.key for name, unit in sorted(context["experts"].items())}
    return {task: fingerprint(common, context["tasks"][task]) for task in targets}


def kept_records(storage, trials: str, keys: dict[str, str]) -> set[tuple[str, str]]:
    """The (task, setting) pairs already scored with the inputs of ``keys``; records (and gate
    routers) written with other inputs are deleted."""
    kept = set()
    for task, key in keys.items():
        for file in storage.files(f"{trials}/{task}"):
            if not file.endswith(".json"):
                continue
            try:
                record = json.loads(storage.read_text(f"{trials}/{task}/{file}"))
            except (ValueError, UnicodeDecodeError):
                record = {}
            if record.get("context_key") == key:
                kept.add((task, record["setting"]))
            else:
                storage.delete(f"{trials}/{task}/{file}")
                storage.delete(f"{trials}/{task}/{file.removesuffix('.json')}.{MixtureFiles.ROUTERS}")
    return kept


def remove_unfinished_experiments(storage, ray_folder: str, prefix: str) -> None:
    """Tune's folders of searches that a crash cut short: their trials are scored again (or were
    kept, see :func:`kept_records`), so nothing in them is read."""
    names = {path.split("/", 1)[0] for path in storage.files(ray_folder) if path.startswith(prefix)}
    for name in sorted(names):
        if not storage.exists(f"{ray_folder}/{name}/{FINISHED_MARK}"):
            storage.delete(f"{ray_folder}/{name}")


def run_mixture_stage(config, layout: RunLayout, tasks, mixings: dict[str, Mixing], experts: dict[str, Unit],
                      seed: int | None = None) -> dict[str, Outcome]:
    """Search the mixtures not done yet (one per target task, or one per method and task) with
    ``seed`` (default: the config's); commit each one's best setting. A setting is tried once per
    task, whichever mixtures choose from it."""
    seed = config.seed if seed is None else seed
    todo = [mixings[label] for label in pending({label: m.unit for label, m in mixings.items()}, "mix", log)]
    if not todo:
        return {}
    if not experts:
        return {m.label: Failed("no expert was trained") for m in todo}

    cfg = config.mixture
    wait_for_resources({"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}, "a mixer trial",
                       config.resources.placement_timeout_s, "mixture.cpus_per_trial / gpus_per_trial")
    storage, trials = layout.storage, layout.mixture_trials
    jobs = _trial_jobs(todo)
    targets = sorted({job["task"] for job in jobs})
    context = trial_context(config, tasks, targets, experts, storage, trials, seed)
    context["keys"] = trial_keys(context, targets)
    # A setting scored by an earlier attempt with the same inputs (a crash came after it) is not
    # scored again; records of other inputs are deleted, never read back.
    scored = kept_records(storage, trials, context["keys"])
    jobs = [job for job in jobs if (job["task"], setting_label(job["setting"])) not in scored]
    if scored:
        log.info("mix: %d setting(s) scored before with the same inputs are kept; %d to score", len(scored), len(jobs))
    experiment = f"mix-{seed}-{int(time.time())}-{config.name}"  # the run's name, for the dashboard
    remove_unfinished_experiments(storage, layout.ray, f"mix-{seed}-")
    started = time.time()
    errors = _search(jobs, cfg, config, context, storage, layout.ray, experiment) if jobs else {}
    results: dict[str, Outcome] = {}
    for name in targets:
        records = [json.loads(storage.read_text(f"{trials}/{name}/{file}"))
                   for file in storage.files(f"{trials}/{name}") if file.endswith(".json")]
        for mixing in (m for m in todo if m.task == name):
            keys = {setting_label(s) for s in mixing.settings}
            mine = [r for r in records if r["setting"] in keys]
            if not mine:
                results[mixing.label] = Failed(errors.get(name, "no trial finished"))
                log.error("mix: %s failed: %s", mixing.label, results[mixing.label].reason)
                continue
            results[mixing.label] = Done(_commit(mixing, mine, experts, cfg))
    log.info("mix stage took %.1f s", time.time() - started)
    return results


def _search(jobs: list[dict], cfg, config, context: dict, storage, ray_folder: str, experiment: str
            ) -> dict[str, str]:
    """One Tune experiment over ``jobs``; returns the error of a failed trial by target task. The
    experiment's folder (Tune's own logs, TensorBoard's among them) is marked finished at its end."""
    per_task = {name: sum(job["task"] == name for job in jobs) for name in {job["task"] for job in jobs}}
    callbacks = tune_callbacks(config.tracking.model_dump(mode="json"), config.name) + [TrialProgress(per_task)]
    trainable = tune.with_resources(tune.with_parameters(MixtureTrial, context=context),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    keep_credentials_out_of_trials()
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True,
                                    scheduler=make_scheduler(cfg.scheduler, cfg.cv_folds),
                                    trial_name_creator=lambda t: f"mix:{t.config['job']['task']}:"
                                                                 f"{setting_label(t.config['job']['setting'])}",
                                    trial_dirname_creator=lambda t: f"{t.config['job']['task']}-{t.trial_id}"),
        run_config=tune.RunConfig(name=experiment, storage_path=storage.path(ray_folder),
                                  storage_filesystem=storage.filesystem,
                                  verbose=0, callbacks=callbacks,
                                  # a trial whose worker dies starts again (from nothing: it is deterministic)
                                  failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES),
                                  # a trial keeps nothing to resume from (see PerTaskScheduler)
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )
    grid = tuner.fit()
    errors: dict[str, str] = {}
    for result in grid:
        if result.error:
            task = _trial_task(result)
            errors[task] = str(result.error).splitlines()[0][:300]
            stop_if_disk_failed(root_cause(result.error), f"mix {task}")
    storage.write_text(f"{ray_folder}/{experiment}/{FINISHED_MARK}", "")
    return errors


def _trial_task(result) -> str:
    """The target task of a Tune result; a trial that failed before it reported has no config, but
    its folder is named ``<task>-<trial id>`` (see ``trial_dirname_creator``)."""
    config = result.config or {}
    if "job" in config:
        return config["job"]["task"]
    return Path(str(result.path or "unknown-trial")).name.rsplit("-", 1)[0]


def _trial_jobs(mixings: list[Mixing]) -> list[dict]:
    """One Tune trial per (target task, setting) that a pending mixture chooses from."""
    jobs = {(m.task, setting_label(s)): {"task": m.task, "setting": s} for m in mixings for s in m.settings}
    return list(jobs.values())


TIE_TOLERANCE = 1e-6  # relative: scores this close are equal (float sums differ in the last bits by trial order)


def best_record(records: list[dict], order: list[str]) -> dict:
    """The record with the lowest CV loss (the objective without folds). Settings that score the
    same within :data:`TIE_TOLERANCE` (one expert mixed by every method, say) are a tie, won by the
    setting listed first in ``order`` (the config's): never by which trial happened to finish
    first or on which worker, which would change the choice between two runs of one config."""
    def score(record: dict) -> float:
        return record["cv_loss"] if record["cv_loss"] is not None else record["objective"]

    lowest = min(score(r) for r in records)
    tied = [r for r in records if score(r) <= lowest + TIE_TOLERANCE * max(1.0, abs(lowest))]
    rank = {key: i for i, key in enumerate(order)}
    return min(tied, key=lambda r: (rank.get(r["setting"], len(rank)), r["setting"]))


def _commit(mixing: Mixing, records: list[dict], experts: dict[str, Unit], cfg) -> dict:
    """Keep the best setting's mixture: its weights, the merged adapter, and every trial's search."""
    unit = mixing.unit
    best = best_record(records, [setting_label(s) for s in mixing.settings])
    summary = {"status": "done", **{k: best[k] for k in ("method", "budget", "bound", "l1", "top_k", "setting")},
               "cv_loss": best["cv_loss"], "objective": best["objective"], "weights": best["weights"],
               "experts_mixed": best["experts_mixed"], "zero_weights_loss": best["zero_weights_loss"],
               "precision": best.get("precision"),
               "candidates": [{"setting": r["setting"], "cv_loss": r["cv_loss"]} for r in records],
               "system": mixing.system, "settings_tried": len(mixing.settings),  # those missing from candidates were stopped early
               **{k: best[k] for k in (*ORDER_KEYS, "control") if k in best}}
    with unit.writing(summary) as staging:
        write_json(staging / MixtureFiles.SUMMARY, {**summary, "optimizer": cfg.optimizer,
                                              "experts": {n: e.prefix for n, e in experts.items()}})
        write_json(staging / MixtureFiles.SEARCH, {"trials": records})
        if best["method"] == "gate":  # per-token weights: the routers are the mixture
            unit.storage.download(best["routers"], staging / MixtureFiles.ROUTERS)
        else:
            export_adapter({n: local_folder(e) for n, e in experts.items()}, best["method"],
                           [best["weights"][n] for n in experts], staging / "adapter")
    log.info("mix: %s: %s, cv loss %s, weights %s", mixing.label, best["setting"],
             "–" if best["cv_loss"] is None else f"{best['cv_loss']:.3f}",
             {k: round(v, 2) for k, v in best["weights"].items()})
    return summary
