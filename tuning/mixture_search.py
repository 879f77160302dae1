"""Stage 3 on Ray Tune: the mixture of experts for every target task.

One Tune trial = one target task and one setting of the mixer (method, budget, bound, L1, top-k).
Inside the trial the whole weight search runs through its optimizer's ask/tell interface (a Tune
trial per weight candidate would cost more in overhead than the objective itself). The student
and the experts are loaded once per Tune worker process and reused by every trial it runs
(``reuse_actors``). A trial scores its setting by cross-validation over the few-shot examples
(weights fitted on k-1 folds, loss on the held-out fold), reported fold by fold so that a poor
setting can be stopped early (ASHA or median stopping, within its target task); then it refits the
weights on all few-shot examples. The setting with the lowest CV loss wins. Test data never enters.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

from modecotd.artifacts import Unit, pending, write_json
from modecotd.config import MIXER_CANDIDATES
from modecotd.errors import UserError
from modecotd.jobs.progress import send
from modecotd.mixture import Mixture, export_adapter
from modecotd.plan import RunLayout
from modecotd.tasks.schema import AnswerKind
from modecotd.weight_search import search_weights

log = logging.getLogger(__name__)
METRIC = "cv_loss"
_MIXTURES: dict[tuple, Mixture] = {}  # per Tune worker process, reused across its trials
_LOADS: list[float] = []  # when this process loaded a student (a trial record says how often)
_METRICS: dict = {}


def _folds(n: int, k: int) -> list[list[int]]:
    k = max(2, min(k, n))
    return [list(range(i, n, k)) for i in range(k)]


def setting_key(setting: dict) -> str:
    """A readable name for one mixer setting (trial names, record files)."""
    if setting["method"] == "gate":
        return "gate"
    top_k = "all" if setting["top_k"] is None else setting["top_k"]
    return f"{setting['method']}-budget={setting['budget']}-bound={setting['bound']}-l1={setting['l1']}-top_k={top_k}"


def _mixture(context: dict, method: str) -> Mixture:
    """This worker's student with the experts, loaded on its first trial and reused after."""
    key = (context["student_dir"], tuple(sorted(context["experts"].items())), context["dtype"])
    if key not in _MIXTURES:
        _MIXTURES.clear()  # one student in memory per worker
        _MIXTURES[key] = Mixture(Path(context["student_dir"]), {n: Path(p) for n, p in context["experts"].items()},
                                 method, context["dtype"])
        _LOADS.append(time.time())
    mixture = _MIXTURES[key]
    mixture.use_method(method)
    return mixture


def top_experts(mixture: Mixture, batch: dict, k: int | None) -> list[int]:
    """Indices of the k experts with the lowest few-shot loss on their own (all when k is None)."""
    n = len(mixture.names)
    if k is None or k >= n:
        return list(range(n))
    alone = mixture.candidate_losses(batch, torch.eye(n))
    return sorted(sorted(range(n), key=lambda i: alone[i])[:k])


def fit_weights(mixture: Mixture, batch: dict, chosen: list[int], setting: dict, context: dict,
                on_evaluations=lambda count: None):
    """Search the weights of the ``chosen`` experts (the others stay at 0) on ``batch``;
    ``on_evaluations`` hears how many objective evaluations each forward made."""
    n = len(mixture.names)

    def full(weights) -> torch.Tensor:
        w = torch.zeros(n)
        w[chosen] = torch.as_tensor(weights, dtype=torch.float32)
        return w

    def candidate_losses(candidates):
        losses = mixture.candidate_losses(batch, torch.stack([full(w) for w in candidates]))
        on_evaluations(len(candidates))
        return losses

    def loss_and_gradient(weights):
        loss, gradient = mixture.loss_and_gradient(batch, full(weights))
        on_evaluations(1)
        return loss, [gradient[i] for i in chosen]

    result = search_weights(
        candidate_losses, len(chosen), optimizer=context["optimizer"], budget=setting["budget"],
        bound=setting["bound"], l1=setting["l1"], seed=context["seed"], start=[context["start"]] * len(chosen),
        batch=MIXER_CANDIDATES.resolve(context["candidates_per_forward"], mixture.device),  # auto: by device
        loss_and_gradient=loss_and_gradient, learning_rate=context["learning_rate"])
    return result, full(result.weights).tolist()


def mixture_trial(config: dict, context: dict) -> None:
    """A Tune function trainable: score one mixer setting for one target task by CV, then fit it."""
    task, setting = config["task"], config["setting"]
    spec = context["tasks"][task]
    kind = AnswerKind(spec["kind"])
    mixture = _mixture(context, setting["method"])
    rows = spec["fewshot"]
    label = f"mix:{task}:{setting_key(setting)}"
    gate = setting["method"] == "gate"
    pooled = [r for name, other in context["pooled"].items() if name != task for r in other] if gate else []

    def batch(indices, extra=()):
        return mixture.batch_for([rows[i] for i in indices] + list(extra), kind, context["max_length"])

    folds = _folds(len(rows), context["cv_folds"]) if context["cv_folds"] else []  # 0: one setting, no choice
    per_fit = context["gate_steps"] if gate else setting["budget"]
    progress = {"done": 0, "planned": per_fit * (len(folds) + 1)}

    def counted(count: int) -> None:  # the driver's terminal shows each trial's evaluations as they happen
        progress["done"] += count
        send("mix", f"{task} / {setting_key(setting)}", progress["done"], progress["planned"],
             "gate step" if gate else "evaluation", finished=progress["done"] >= progress["planned"])

    def fit(indices):
        """Fit on these few-shot rows; returns (weights or None, history, seconds)."""
        if gate:
            started = time.time()
            losses = mixture.fit_gate(batch(indices, pooled), steps=context["gate_steps"],
                                      learning_rate=context["gate_learning_rate"], seed=context["seed"])
            history = [{"evaluation": i, "loss": loss, "objective": loss} for i, loss in enumerate(losses)]
            counted(len(losses))
            return None, history, time.time() - started
        result, weights = fit_weights(mixture, batch(indices), chosen, setting, context, counted)
        return weights, result.history, result.seconds

    def loss_at(weights, indices) -> float:
        if not gate:
            mixture.set_weights(weights)
        return mixture.few_shot_loss(batch(indices))

    everything = list(range(len(rows)))
    all_rows = batch(everything)  # tokenised once for expert selection, the zero-weight loss and the gate's mean
    chosen = list(range(len(mixture.names))) if gate else top_experts(mixture, all_rows, setting["top_k"])
    held_out: list[float] = []
    evaluations = 0
    for fold, held in enumerate(folds):
        weights, fold_history, _ = fit([i for i in everything if i not in held])
        evaluations += len(fold_history)
        held_out.append(loss_at(weights, held))
        tune.report({METRIC: sum(held_out) / len(held_out), "fold": fold, "evaluations": evaluations})
        print(f"{label}: fold {fold + 1} held-out loss {held_out[-1]:.3f}", flush=True)
    cv_loss = sum(held_out) / len(held_out) if held_out else None
    weights, history, seconds = fit(everything)
    evaluations += len(history)
    record = {"task": task, **setting, "setting": setting_key(setting), "cv_loss": cv_loss, "fold_losses": held_out,
              "objective": min(h["objective"] for h in history), "experts_mixed": [mixture.names[i] for i in chosen],
              "history": history, "search_seconds": seconds, "worker_pid": os.getpid(),
              "student_loads_in_worker": len(_LOADS), "precision": mixture.precision.as_dict()}
    if gate:
        routers = Path(context["trials_dir"]) / f"{task}--gate.routers.safetensors"
        mixture.save_routers(routers)
        record.update(routers=str(routers), weights=dict(zip(mixture.names, mixture.mean_gate_weights(
            all_rows))))  # for the heat map: the gate's mean weights on the few-shot rows
        mixture.use_method("delta")  # for the loss of the student as it is (w = 0)
    else:
        record["weights"] = dict(zip(mixture.names, weights))
    mixture.set_weights(torch.zeros(len(mixture.names)))
    record["zero_weights_loss"] = mixture.few_shot_loss(all_rows)
    write_json(Path(context["trials_dir"]) / f"{task}--{setting_key(setting)}.json", record)
    _trial_metrics(task, cv_loss)
    final = {"objective": record["objective"], "evaluations": evaluations, "done": True}
    tune.report(final if cv_loss is None else {METRIC: cv_loss, **final})


def _trial_metrics(task: str, cv_loss: float | None) -> None:
    """Ray metrics for the dashboard: finished mixer trials and the last CV loss, per target task
    (made once per worker process, which runs many trials)."""
    from ray.util.metrics import Counter, Gauge

    if not _METRICS:
        _METRICS["done"] = Counter("modecotd_mix_trials_done", "mixer settings scored to the end", ("task",))
        _METRICS["cv_loss"] = Gauge("modecotd_mix_cv_loss", "CV few-shot loss of the last finished setting",
                                    ("task",))
    _METRICS["done"].inc(1, {"task": task})
    if cv_loss is not None:
        _METRICS["cv_loss"].set(cv_loss, {"task": task})


class PerTaskScheduler(FIFOScheduler):
    """Early stopping that compares a trial only with trials of the same target task (their loss
    scales differ): one ASHA or median-stopping scheduler per task. A trial is stopped or goes on,
    never paused: it keeps no checkpoint, so a paused trial would start again from nothing."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.schedulers: dict[str, object] = {}

    def _of(self, trial):
        task = trial.config["task"]
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

    def __init__(self, settings_per_task: int):
        self.total = settings_per_task
        self.trials: dict[str, dict[str, dict]] = {}  # task -> trial id -> its last result

    def _send(self, task: str) -> None:
        trials = self.trials[task]
        finished = sum(r.get("ended", False) for r in trials.values())
        evaluations = sum(r.get("evaluations", 0) for r in trials.values())
        losses = [r[METRIC] for r in trials.values() if METRIC in r]
        best = f", best CV loss {min(losses):.3f}" if losses else ""
        send("mix", task, finished, self.total, "setting", note=f"{evaluations} evaluations{best}",
             finished=finished >= self.total)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        task = trial.config["task"]
        self.trials.setdefault(task, {})[trial.trial_id] = {**result, "ended": False}
        self._send(task)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def _ended(self, trial) -> None:
        task = trial.config["task"]
        self.trials.setdefault(task, {}).setdefault(trial.trial_id, {})["ended"] = True
        self._send(task)


def tune_loggers(cfg, run_name: str) -> list:
    """Ray Tune writes TensorBoard (and CSV, JSON) logs of every trial by itself; MLflow too when
    the config asks for it."""
    if not cfg.mlflow_tracking_uri:
        return []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("mixture.mlflow_tracking_uri needs MLflow: pip install 'modecotd[mlflow]'") from None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=cfg.mlflow_tracking_uri, experiment_name=f"modecotd-{run_name}")]


def run_mixture_stage(config, layout: RunLayout, tasks, units: dict[str, Unit], expert_dirs: dict[str, Path],
                      student_dir: Path) -> dict[str, dict]:
    """Search mixtures for every target task whose unit is not done; commit the best per task."""
    todo = pending(units, "mix", log)
    if not todo:
        return {}
    if not expert_dirs:
        return {name: {"status": "failed", "error": "no expert was trained"} for name in todo}

    cfg = config.mixture
    trials_dir = layout.mixture_trials
    trials_dir.mkdir(parents=True, exist_ok=True)
    for name in todo:  # records of an earlier search with other settings must not be read back
        for stale in trials_dir.glob(f"{name}--*.json"):
            stale.unlink()
    context = {
        "student_dir": str(student_dir), "dtype": config.student.dtype,
        "experts": {n: str(p) for n, p in expert_dirs.items()}, "optimizer": cfg.optimizer, "start": cfg.start,
        "candidates_per_forward": cfg.candidates_per_forward, "learning_rate": cfg.learning_rate,
        "seed": config.seed, "cv_folds": cfg.cv_folds, "max_length": config.distill.max_length,
        "trials_dir": str(trials_dir), "gate_steps": cfg.gate_steps, "gate_learning_rate": cfg.gate_learning_rate,
        "pooled": ({name: [{"question": ex.question, "answer": ex.answer, "rationale": ex.rationale,
                            "kind": task.kind.value} for ex in task.fewshot] for name, task in tasks.items()}
                   if cfg.gate_rows == "pooled" else {}),
        "tasks": {name: {"kind": tasks[name].kind.value,
                         "fewshot": [{"question": ex.question, "answer": ex.answer, "rationale": ex.rationale}
                                     for ex in tasks[name].fewshot]} for name in todo},
    }
    callbacks = tune_loggers(cfg, config.name) + [TrialProgress(len(cfg.settings()))]
    started = time.time()
    trainable = tune.with_resources(tune.with_parameters(mixture_trial, context=context),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    space = {"task": tune.grid_search(todo), "setting": tune.grid_search(cfg.settings())}
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials, reuse_actors=True,
                                    scheduler=make_scheduler(cfg.scheduler, cfg.cv_folds),
                                    trial_name_creator=lambda t: f"mix:{t.config['task']}:"
                                                                 f"{setting_key(t.config['setting'])}",
                                    trial_dirname_creator=lambda t: f"{t.config['task']}-{t.trial_id}"),
        run_config=tune.RunConfig(name=f"mix-{int(started)}", storage_path=str(layout.ray_storage),
                                  verbose=0, callbacks=callbacks),
    )
    grid = tuner.fit()
    errors = {r.config["task"]: str(r.error).splitlines()[0][:300] for r in grid if r.error}
    results: dict[str, dict] = {}
    for name in todo:
        records = [json.loads(path.read_text()) for path in sorted(trials_dir.glob(f"{name}--*.json"))]
        if not records:
            results[name] = {"status": "failed", "error": errors.get(name, "no trial finished")}
            log.error("mix: %s failed: %s", name, results[name]["error"])
            continue
        results[name] = _commit(units[name], records, context, cfg)
    log.info("mix stage took %.1f s", time.time() - started)
    return results


def _commit(unit: Unit, records: list[dict], context: dict, cfg) -> dict:
    """Keep the best setting's mixture: its weights, the merged adapter, and every trial's search."""
    best = min(records, key=lambda r: r["cv_loss"] if r["cv_loss"] is not None else r["objective"])
    summary = {"status": "done", **{k: best[k] for k in ("method", "budget", "bound", "l1", "top_k", "setting")},
               "cv_loss": best["cv_loss"], "objective": best["objective"], "weights": best["weights"],
               "experts_mixed": best["experts_mixed"], "zero_weights_loss": best["zero_weights_loss"],
               "precision": best.get("precision"),
               "candidates": [{"setting": r["setting"], "cv_loss": r["cv_loss"]} for r in records],
               "settings_tried": len(cfg.settings())}  # those missing from candidates were stopped early
    with unit.writing(summary) as staging:
        write_json(staging / "mixture.json", {**summary, "optimizer": cfg.optimizer, "experts": context["experts"]})
        write_json(staging / "search.json", {"trials": records})
        if best["method"] == "gate":  # per-token weights: the routers are the mixture
            shutil.copyfile(best["routers"], staging / "routers.safetensors")
        else:
            experts = {n: Path(p) for n, p in context["experts"].items()}
            export_adapter(experts, best["method"], [best["weights"][n] for n in experts], staging / "adapter")
    log.info("mix: %s: %s, cv loss %s, weights %s", best["task"], best["setting"],
             "–" if best["cv_loss"] is None else f"{best['cv_loss']:.3f}",
             {k: round(v, 2) for k, v in best["weights"].items()})
    return summary
