"""Stage 1 on Ray: a pool of named teacher actors, each loading its backend once.

Batches of train questions from every unfinished task are fanned out over the pool (an idle
actor takes the next batch); a task's rationales are committed as one unit once all its batches
are back: ``rationales/<task>/accepted.jsonl`` and ``rejected.jsonl`` (with reasons).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import ray
from ray.util import ActorPool
from tqdm import tqdm

from modecotd.artifacts import Unit, pending, write_jsonl
from modecotd.tasks.schema import Example, TaskData
from modecotd.teacher import label_candidates, make_backend

log = logging.getLogger(__name__)


@ray.remote
class TeacherWorker:
    """Holds one teacher backend; answers batches of questions."""

    def __init__(self, backend: str, model_dir: str | None, settings: dict):
        self.backend = make_backend(backend, Path(model_dir) if model_dir else None, **settings)

    def run_batch(self, task: str, kind, examples: list[dict]) -> tuple[str, list[dict], list[dict]]:
        batch = [Example(**e) for e in examples]
        candidates = self.backend.candidates(batch, kind)
        accepted, rejected = label_candidates(batch, candidates, kind)
        return task, accepted, rejected


def run_teacher_stage(config, run_dir: Path, tasks: dict[str, TaskData], units: dict[str, Unit],
                      teacher_dir: Path | None) -> dict[str, dict]:
    """Generate and filter rationales for every seen task whose unit is not done yet."""
    todo = {name: tasks[name] for name in pending(units, "teacher", log)}
    if not todo:
        return {}
    cfg = config.teacher
    settings = {}
    if cfg.backend == "transformers":
        settings = dict(dtype=config.student.dtype, samples=cfg.samples, temperature=cfg.temperature,
                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=config.seed)
    n_actors = max(1, min(cfg.actors, sum(len(t.train) for t in todo.values())))
    actors = [
        TeacherWorker.options(name=f"teacher-{i}", num_cpus=cfg.cpus_per_actor).remote(
            cfg.backend, str(teacher_dir) if teacher_dir else None, settings)
        for i in range(n_actors)
    ]
    jobs = [(name, data.kind, [asdict(ex) for ex in data.train[i:i + cfg.batch_size]])
            for name, data in todo.items() for i in range(0, len(data.train), cfg.batch_size)]
    accepted: dict[str, list[dict]] = {name: [] for name in todo}
    rejected: dict[str, list[dict]] = {name: [] for name in todo}
    started = time.time()
    pool = ActorPool(actors)
    try:
        results = pool.map_unordered(lambda actor, job: actor.run_batch.remote(*job), jobs)
        for name, good, bad in tqdm(results, total=len(jobs), desc="teacher batches", unit="batch"):
            accepted[name].extend(good)
            rejected[name].extend(bad)
    finally:
        for actor in actors:
            ray.kill(actor)
    summaries = {}
    for name, data in todo.items():
        order = {ex.question: i for i, ex in enumerate(data.train)}
        good = sorted(accepted[name], key=lambda r: (order[r["question"]], r["sample"]))
        bad = sorted(rejected[name], key=lambda r: (order[r["question"]], r["sample"]))
        answered = {r["question"] for r in good}
        summary = {
            "backend": cfg.backend, "model": cfg.model if cfg.backend == "transformers" else None,
            "questions": len(data.train), "accepted": len(good), "rejected": len(bad),
            "questions_with_rationale": len(answered),
            "yield": len(answered) / max(1, len(data.train)),
            "rejection_reasons": dict(Counter(r["reason"] for r in bad)),
        }
        with units[name].writing(summary) as staging:
            write_jsonl(staging / "accepted.jsonl", good)
            write_jsonl(staging / "rejected.jsonl", bad)
        summaries[name] = summary
        log.info("teacher: %s: %d of %d questions got a correct rationale (%d rejected samples)",
                 name, len(answered), len(data.train), len(bad))
    log.info("teacher stage took %.1f s", time.time() - started)
    return summaries

