"""Stage 3 on Ray Tune: the mixer's weight search for every target task.

One Tune trial = one target task and one L1 coefficient. Inside the trial the student is loaded
once and the whole Nevergrad search runs there (a Tune trial per weight candidate would cost
more in overhead than the objective itself). The trial reports a cross-validated few-shot loss
(weights fitted on k-1 folds, loss on the held-out fold) which picks the L1 coefficient, and the
weights refitted on all few-shot examples. Test data never enters.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ray import tune

from modecotd.artifacts import Unit, pending, write_json
from modecotd.mixture import LoraHubMixer, search_weights
from modecotd.tasks.schema import AnswerKind

log = logging.getLogger(__name__)


def _folds(n: int, k: int) -> list[list[int]]:
    k = max(2, min(k, n))
    return [list(range(i, n, k)) for i in range(k)]


def mixture_trial(trial_config: dict, context: dict) -> None:
    """A Tune function trainable: fit weights for (task, l1), report the CV loss."""
    task, l1 = trial_config["task"], trial_config["l1"]
    spec = context["tasks"][task]
    kind = AnswerKind(spec["kind"])
    mixer = LoraHubMixer(Path(context["student_dir"]), {n: Path(p) for n, p in context["experts"].items()},
                         context["dtype"])
    rows = spec["fewshot"]
    search = dict(budget=context["budget"], bound=context["bound"], seed=context["seed"], l1=l1)

    def loss_on(batch):
        def objective(weights):
            mixer.set_weights(weights)
            return mixer.few_shot_loss(batch)
        return objective

    held_out = []
    for fold, held in enumerate(_folds(len(rows), context["cv_folds"])):
        fit_rows = [r for i, r in enumerate(rows) if i not in held]
        result = search_weights(loss_on(mixer.batch_for(fit_rows, kind, context["max_length"])), len(mixer.names),
                                **search)
        held_out.append(loss_on(mixer.batch_for([rows[i] for i in held], kind, context["max_length"]))(result.weights))
        tune.report({"fold": fold, "fold_loss": held_out[-1]})
        print(f"mix:{task}:l1={l1}: fold {fold + 1} held-out loss {held_out[-1]:.3f}", flush=True)
    cv_loss = sum(held_out) / len(held_out)
    final = search_weights(loss_on(mixer.batch_for(rows, kind, context["max_length"])), len(mixer.names), **search)
    record = {"task": task, "l1": l1, "cv_loss": cv_loss, "fold_losses": held_out, "objective": final.objective,
              "weights": dict(zip(mixer.names, final.weights)), "history": final.history,
              "zero_weights_loss": final.history[0]["loss"] if final.history else None}
    write_json(Path(context["trials_dir"]) / f"{task}--l1={l1}.json", record)
    tune.report({"cv_loss": cv_loss, "objective": final.objective, "done": True})


def run_mixture_stage(config, run_dir: Path, tasks, units: dict[str, Unit], expert_dirs: dict[str, Path],
                      student_dir: Path) -> dict[str, dict]:
    """Search mixtures for every target task whose unit is not done; commit the best per task."""
    todo = pending(units, "mix", log)
    if not todo:
        return {}
    if not expert_dirs:
        return {name: {"status": "failed", "error": "no expert was trained"} for name in todo}

    cfg = config.mixture
    trials_dir = run_dir / "mixtures" / ".trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    for name in todo:  # records of an earlier search with other settings must not be read back
        for stale in trials_dir.glob(f"{name}--l1=*.json"):
            stale.unlink()
    context = {
        "student_dir": str(student_dir), "dtype": config.student.dtype, "experts": {n: str(p) for n, p in expert_dirs.items()},
        "budget": cfg.budget, "bound": cfg.bound, "seed": config.seed, "cv_folds": cfg.cv_folds,
        "max_length": config.distill.max_length, "trials_dir": str(trials_dir),
        "tasks": {name: {"kind": tasks[name].kind.value,
                         "fewshot": [{"question": ex.question, "answer": ex.answer, "rationale": ex.rationale}
                                     for ex in tasks[name].fewshot]} for name in todo},
    }
    started = time.time()
    trainable = tune.with_resources(tune.with_parameters(mixture_trial, context=context), {"cpu": cfg.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"task": tune.grid_search(todo), "l1": tune.grid_search(list(cfg.l1))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent_trials,
                                    trial_name_creator=lambda t: f"mix:{t.config['task']}:l1={t.config['l1']}",
                                    trial_dirname_creator=lambda t: f"{t.config['task']}-l1={t.config['l1']}-{t.trial_id}"),
        run_config=tune.RunConfig(name=f"mix-{int(started)}", storage_path=str((run_dir / "ray").resolve()),
                                  verbose=0),
    )
    grid = tuner.fit()
    errors = {r.config["task"]: str(r.error).splitlines()[0][:300] for r in grid if r.error}
    results: dict[str, dict] = {}
    for name in todo:
        records = [json.loads((trials_dir / f"{name}--l1={l1}.json").read_text())
                   for l1 in cfg.l1 if (trials_dir / f"{name}--l1={l1}.json").is_file()]
        if not records:
            results[name] = {"status": "failed", "error": errors.get(name, "no trial finished")}
            log.error("mix: %s failed: %s", name, results[name]["error"])
            continue
        best = min(records, key=lambda r: r["cv_loss"])
        summary = {"status": "done", "l1": best["l1"], "cv_loss": best["cv_loss"], "objective": best["objective"],
                   "weights": best["weights"], "zero_weights_loss": best["zero_weights_loss"],
                   "candidates": [{"l1": r["l1"], "cv_loss": r["cv_loss"]} for r in records]}
        with units[name].writing(summary) as staging:
            write_json(staging / "mixture.json", {**summary, "method": cfg.method, "optimizer": cfg.optimizer,
                                                  "experts": context["experts"]})
            write_json(staging / "search.json", {"trials": records})
        results[name] = summary
        log.info("mix: %s: l1=%s cv loss %.3f, weights %s", name, best["l1"], best["cv_loss"],
                 {k: round(v, 2) for k, v in best["weights"].items()})
    log.info("mix stage took %.1f s", time.time() - started)
    return results
