"""Stage 2 on Ray: one Ray Train ``TorchTrainer`` job per seen task, DeepSpeed inside.

Each job's ``fit()`` runs in its own Ray task (no CPUs of its own: the CPUs belong to the
training workers), so jobs for different tasks run concurrently and queue when CPUs run out.
Every worker resolves the student on its own node; rank 0 writes the adapter into a staging folder
on its node and commits the unit to the run's storage itself, so nothing it wrote has to be read
back from its node's disk. Ray Train's checkpoints live in the run's storage too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from modecotd.artifacts import Unit, pending
from modecotd.distill import DistillSettings, train_expert
from modecotd.errors import UserError
from modecotd.jobs.liveness import train_health_env
from modecotd.jobs.placement import wait_for_resources
from modecotd.jobs.progress import send
from modecotd.jobs.ray_runtime import stop_if_disk_failed, this_cluster_env
from modecotd.jobs.worker_pool import WorkerPool
from modecotd.models import materialize
from modecotd.outcome import Done, Failed, Outcome
from modecotd.plan import RunLayout, Training
from modecotd.units import RationaleFiles, TrainingFiles, TrainingSummary
from modecotd.tracking import Tracker

log = logging.getLogger(__name__)

REPORT_EVERY_STEPS = 10


class RayTrainCheckpoints:
    """modecotd.distill's checkpoint hooks on Ray Train: every rank writes its part of a checkpoint
    into a temporary folder and reports it; Ray Train merges the parts in its storage and hands
    the newest back to a restarted worker group."""

    def latest(self):
        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)

    def save(self, metrics: dict, write) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the plain PyTorch + DeepSpeed loop of modecotd.distill."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ray").setLevel(logging.WARNING)  # no line per ray.train.report: the driver shows progress
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    unit: Unit = loop_config["unit"]
    staging = unit.begin() if rank == 0 else None
    settings = dataclasses.replace(loop_config["settings"], student_dir=str(materialize(loop_config["student"])),
                                   student=loop_config["student"], output_dir=str(staging or ""))
    checkpoint_every = settings.checkpoint_every

    gauges = {}
    if rank == 0:  # Ray metrics for the dashboard's Grafana: where each expert's training is
        from ray.util.metrics import Gauge

        gauges = {key: Gauge(f"modecotd_distill_{key}", text, ("task",)) for key, text in (
            ("step", "optimizer steps done"), ("loss", "training loss at the last step"),
            ("target_tokens", "target tokens trained on by rank 0"))}

    # rank 0 logs to the run's experiment trackers (this job's loss and speed per step, then its
    # summary); the other ranks' tracker has no tracker to open
    layout_root = unit.storage.local_root if rank == 0 and unit.storage.is_local else None
    tracker = Tracker(loop_config.get("tracking", {}) if rank == 0 else {}, loop_config.get("run", ""), "distill",
                      loop_config["task"], params=asdict(loop_config["settings"]) | {"student": loop_config["student"]},
                      tensorboard_dir=layout_root / "tensorboard" / "distill" / loop_config["task"]
                      if layout_root is not None else None)

    def report(metrics: dict) -> None:
        for key, gauge in gauges.items():
            gauge.set(float(metrics[key]), {"task": loop_config["task"]})
        if rank == 0:
            send("distill", loop_config["task"], metrics["step"], metrics["total_steps"], "step",
                 note=f"loss {metrics['loss']:.3f}, {metrics['target_tokens_per_s']:.0f} target tokens/s")
            tracked.log({k: metrics[k] for k in ("loss", "lr", "target_tokens_per_s", "validation_loss")
                         if k in metrics}, metrics["step"])
        # Every rank reports at the same steps (Ray Train needs that); checkpoint steps report there.
        step = metrics["step"]
        if step % REPORT_EVERY_STEPS == 0 and not (checkpoint_every and step % checkpoint_every == 0):
            ray.train.report(dict(metrics))

    started = time.time()
    with tracker as tracked:
        try:
            summary = train_expert(settings, rank, world, report=report, checkpoints=RayTrainCheckpoints())
            if rank == 0:
                (staging / TrainingFiles.SUMMARY).write_text(json.dumps(summary.to_json()))
                tracked.log({"final_loss": summary.final_loss, "best_validation_loss": summary.best_validation_loss,
                             "target_tokens_per_s_rank0": summary.target_tokens_per_s_rank0}, summary.steps)
                if not settings.full_finetune:  # an adapter is small; a whole model is not logged
                    tracked.artifacts(staging, "adapter")
                unit.commit(staging, summary.without_losses().to_json(), time.time() - started)
        finally:
            if staging is not None:
                Unit.abort(staging)  # gone already when committed
    ray.train.report({"step": summary.steps, "loss": summary.final_loss, "done": True})


def stage_metrics() -> dict:
    """The driver's Ray metrics for the stage, per task: experts done and failed, final loss and
    rank 0's target tokens per second (the workers' own gauges show a job's progress while it runs)."""
    from ray.util.metrics import Counter, Gauge

    tags = ("task",)
    return {"done": Counter("modecotd_distill_experts_done", "experts trained", tags),
            "failed": Counter("modecotd_distill_experts_failed", "expert jobs that failed", tags),
            "final_loss": Gauge("modecotd_distill_final_loss", "an expert's training loss at its end", tags),
            "speed": Gauge("modecotd_distill_target_tokens_per_second", "rank 0's target tokens per second", tags)}


@ray.remote(num_cpus=0)
def fit_expert(task: str, unit: Unit, student: str, settings: DistillSettings, workers: int, cpus_per_worker: float,
               ray_storage: tuple, run_name: str, max_failures: int, gpus_per_worker: float = 0,
               tracking: dict | None = None, run: str = "") -> TrainingSummary:
    """Run one expert's Ray Train job to completion; returns the summary of its committed unit.

    ``run_name`` is the same for every attempt at the same expert, so a job started again after
    a driver crash finds the checkpoints of the last attempt in ``ray_storage`` (the run storage and
    the path in it) and resumes from them. With GPUs, Ray Train sets up NCCL instead of gloo; the
    training code is the same.
    """
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    storage, path = ray_storage
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings, "task": task, "unit": unit, "student": student,
                           "tracking": tracking or {}, "run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage.path(path), storage_filesystem=storage.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    manifest = unit.manifest()
    if manifest is None or manifest.get("fingerprint") != unit.key:
        raise RuntimeError(f"{unit.where}: the training job ended without committing its unit")
    return TrainingSummary.from_json(manifest["summary"])


def job_needs(cfg) -> dict:
    """What one training job holds while it runs."""
    need = {"CPU": cfg.workers_per_job * cfg.cpus_per_worker}
    if cfg.use_gpu:
        need["GPU"] = cfg.workers_per_job * cfg.gpus_per_worker
    return need


def concurrent_jobs(cfg, cluster: dict) -> tuple[int, str | None]:
    """How many expert jobs may run at once: the configured limit, lowered to what the cluster
    holds so that jobs queue in the driver instead of waiting on each other for resources; or why
    no job fits at all."""
    need = job_needs(cfg)
    fits = []
    for resource, amount in need.items():
        have = cluster.get(resource, 0)
        if amount > have:
            return 0, (f"one expert job needs {amount:g} {resource} (distill.workers_per_job x "
                       f"{'cpus' if resource == 'CPU' else 'gpus'}_per_worker) but the Ray cluster has {have:g}")
        fits.append(int(have // amount) if amount else cfg.max_concurrent_jobs)
    return max(1, min(cfg.max_concurrent_jobs, *fits)), None


def read_rows(cfg, job: Training) -> list[dict]:
    """The accepted rationales a job trains on (pooled rows carry their task's answer kind), or the
    rows the job carries itself (a control's few-shot rows)."""
    if job.rows:
        return [dict(r) for r in job.rows]
    rows = []
    for rationales, kind in job.sources:
        task_rows = [json.loads(line) for line in rationales.read_file(RationaleFiles.ACCEPTED).splitlines() if line.strip()]
        if not cfg.use_rationalized:
            task_rows = [r for r in task_rows if not r.get("rationalized")]
        if cfg.max_rows_per_task:
            task_rows = task_rows[: cfg.max_rows_per_task]
        rows.extend({**r, "kind": kind} if len(job.sources) > 1 else r for r in task_rows)
    return rows


def distill_settings(config, job: Training, rows: list[dict]) -> DistillSettings:
    """The job's settings: the distill section's fields of the same name, then what the job or the
    student decides; each worker fills in where the student and its output are on its node."""
    cfg = config.distill
    return DistillSettings.from_section(
        cfg, student_dir="", output_dir="", dtype=config.student.dtype, prompt_format=config.student.prompt_format,
        kind=job.kind or job.sources[0][1], rows=rows, lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules,
        learning_rate=cfg.full_finetune_learning_rate if job.full_finetune else cfg.learning_rate,
        epochs=job.epochs or cfg.epochs, seed=job.seed, full_finetune=job.full_finetune,
        # a few-shot control's handful of rows is too few to hold any out
        validation_fraction=0.0 if job.rows else cfg.validation_fraction,
        early_stopping_patience=None if job.rows else cfg.early_stopping_patience)


def run_distill_stage(config, layout: RunLayout, jobs: dict[str, Training]) -> dict[str, Outcome]:
    """Train every job whose unit is not done, as many at once as allowed; returns each job's
    outcome by its name."""
    cfg = config.distill
    todo = pending({name: job.unit for name, job in jobs.items()}, "distill", log)
    if not todo:
        return {}
    try:  # an autoscaled cluster may not hold one job yet: wait for nodes first
        wait_for_resources(job_needs(cfg), "an expert's training job", config.resources.placement_timeout_s,
                           "distill.workers_per_job x cpus_per_worker / gpus_per_worker")
    except UserError:
        pass  # concurrent_jobs says why, and every job is recorded as failed
    limit, problem = concurrent_jobs(cfg, ray.cluster_resources())
    if problem:
        log.error("distill: %s", problem)
        return {name: Failed(problem) for name in todo}
    # The longest jobs first (a baseline pooling every task's rationales), so that they do not run
    # alone at the end while the other slots stand idle.
    todo.sort(key=lambda name: len(jobs[name].sources), reverse=True)
    stage = DistillJobs(config, layout, jobs)
    WorkerPool("training job", limit).run(stage.ready(todo), stage.submit, stage.done, stage.failed)
    return stage.results


class DistillJobs:
    """The distill stage's side of the worker pool: each job's rows, its Ray Train job, its outcome."""

    def __init__(self, config, layout: RunLayout, jobs: dict[str, Training]):
        self.config, self.jobs = config, jobs
        self.ray_storage = (layout.storage, layout.ray)
        self.results: dict[str, Outcome] = {}
        self.metrics = stage_metrics()

    def ready(self, todo: list[str]):
        """Each job with its rows, read as slots come free (one job's rows in memory per running
        job); a job with none is recorded as failed."""
        for name in todo:
            rows = read_rows(self.config.distill, self.jobs[name])
            if rows:
                yield name, rows
                continue
            self.results[name] = Failed("no few-shot rows to train on" if self.jobs[name].target
                                        else "the teacher kept no rationale for this task")
            log.error("distill: %s: no rationales to train on", name)

    def submit(self, _, item: tuple[str, list[dict]]):
        name, rows = item
        config, cfg, job = self.config, self.config.distill, self.jobs[name]
        ref = fit_expert.options(name=f"distill:{name}", runtime_env={"env_vars": {
            **this_cluster_env(), **train_health_env(config.resources.stall_timeout_s)}}).remote(
            name, job.unit, config.student.model, distill_settings(config, job, rows), cfg.workers_per_job,
            cfg.cpus_per_worker, self.ray_storage, f"distill-{name}-{job.unit.key}", cfg.max_failures,
            cfg.gpus_per_worker if cfg.use_gpu else 0, config.tracking.model_dump(mode="json"), config.name)
        log.info("distill: %s started (%d rows, ZeRO-%d)", name, len(rows), cfg.zero_stage)
        return ref

    def done(self, item: tuple[str, list[dict]], summary: TrainingSummary) -> None:
        name = item[0]
        tags = {"task": name}
        self.metrics["done"].inc(1, tags)
        self.metrics["final_loss"].set(summary.final_loss, tags)
        self.metrics["speed"].set(summary.target_tokens_per_s_rank0, tags)
        send("distill", name, summary.steps, summary.steps, "step", finished=True,
             note=f"loss {summary.first_loss:.3f} -> {summary.final_loss:.3f}")
        self.results[name] = Done(summary)
        log.info("distill: %s done: loss %.3f -> %.3f in %d steps", name, summary.first_loss,
                 summary.final_loss, summary.steps)

    def failed(self, item: tuple[str, list[dict]], reason: str, error: Exception) -> None:
        """A failed job is reported; the others go on."""
        name = item[0]
        stop_if_disk_failed(reason, f"distill {name}")
        self.results[name] = Failed(reason)
        send("distill", name, 0, None, "step", note="failed", finished=True)
        log.error("distill: %s failed: %s", name, reason)
        self.metrics["failed"].inc(1, {"task": name})
