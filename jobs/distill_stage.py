"""Stage 2 on Ray: one Ray Train ``TorchTrainer`` job per seen task, DeepSpeed inside.

Each job's ``fit()`` runs in its own Ray task (no CPUs of its own: the CPUs belong to the
training workers), so jobs for different tasks run concurrently and queue when CPUs run out.
The adapter is written by rank 0 into the unit's staging folder and published by the driver.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from modecotd.artifacts import Unit, pending, read_jsonl
from modecotd.distill import DistillSettings, train_expert

log = logging.getLogger(__name__)

REPORT_EVERY_STEPS = 10
SUMMARY_FILE = "training.json"


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the plain PyTorch + DeepSpeed loop of modecotd.distill."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings = DistillSettings(**loop_config["settings"])

    def report(metrics: dict) -> None:
        if metrics["step"] % REPORT_EVERY_STEPS == 0:
            ray.train.report({k: v for k, v in metrics.items()})

    summary = train_expert(settings, rank, world, report=report)
    if rank == 0:
        (Path(settings.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary))
    ray.train.report({"step": summary["steps"], "loss": summary["final_loss"], "done": True})


@ray.remote(num_cpus=0)
def fit_expert(task: str, settings: dict, workers: int, cpus_per_worker: float, storage: str) -> dict:
    """Run one expert's Ray Train job to completion; returns its training summary."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"distill-{task}-{int(time.time())}", storage_path=storage),
    )
    trainer.fit()
    return json.loads((Path(settings["output_dir"]) / SUMMARY_FILE).read_text())


def run_distill_stage(config, run_dir: Path, tasks, rationale_dirs: dict[str, Path], units: dict[str, Unit],
                      student_dir: Path) -> dict[str, dict]:
    """Train every seen task's expert whose unit is not done; returns summaries and failures."""
    cfg = config.distill
    storage = str((run_dir / "ray").resolve())
    todo = pending(units, "distill", log)
    results: dict[str, dict] = {}
    running: dict = {}
    while todo or running:
        while todo and len(running) < cfg.max_concurrent_jobs:
            name = todo.pop(0)
            rows = read_jsonl(rationale_dirs[name] / "accepted.jsonl")
            if not cfg.use_rationalized:
                rows = [r for r in rows if not r.get("rationalized")]
            if cfg.max_rows_per_task:
                rows = rows[: cfg.max_rows_per_task]
            if not rows:
                results[name] = {"status": "failed", "error": "the teacher kept no rationale for this task"}
                log.error("distill: %s: no rationales to train on", name)
                continue
            staging = units[name].begin()
            settings = DistillSettings(
                student_dir=str(student_dir), dtype=config.student.dtype, kind=tasks[name].kind.value,
                rows=rows, output_dir=str(staging), lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size,
                max_length=cfg.max_length, warmup_ratio=cfg.warmup_ratio, zero_stage=cfg.zero_stage,
                seed=config.seed,
            )
            ref = fit_expert.options(name=f"distill:{name}").remote(
                name, asdict(settings), cfg.workers_per_job, cfg.cpus_per_worker, storage)
            running[ref] = (name, staging, time.time())
            log.info("distill: %s started (%d rows, ZeRO-%d)", name, len(rows), cfg.zero_stage)
        ready, _ = ray.wait(list(running), num_returns=1)
        name, staging, started = running.pop(ready[0])
        try:
            summary = ray.get(ready[0])
        except Exception as exc:  # a failed job is reported, the others go on
            Unit.abort(staging)
            results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            log.error("distill: %s failed: %s", name, results[name]["error"])
            continue
        summary = {"status": "done", **{k: v for k, v in summary.items() if k != "losses"}}
        units[name].commit(staging, summary, time.time() - started)
        results[name] = summary
        log.info("distill: %s done: loss %.3f -> %.3f in %d steps", name, summary["first_loss"],
                 summary["final_loss"], summary["steps"])
    return results
