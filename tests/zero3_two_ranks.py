"""Two gloo ranks training one LoRA expert under ZeRO-3, for tests/test_deepspeed.py (run as
``python -m tests.zero3_two_ranks STUDENT OUT``): each rank prints one JSON line saying what it held
after loading the student, whether DeepSpeed's parameter trace completed (the engine's own forward
ran, so ZeRO-3 can prefetch), what it kept of the trained weights, and its losses."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int, port: int, student: str, out: str) -> None:
    import deepspeed

    import modecotd.distill as distill
    from modecotd.models import load_lm
    from modecotd.tasks.generators import generate

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", 8, seed=0, size=2)]
    settings = distill.DistillSettings(student_dir=student, dtype="fp32", kind="yes_no", rows=rows, output_dir=out,
                                       lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4, epochs=2,
                                       zero_stage=3, max_length=160, validation_fraction=0.25)
    model = load_lm(Path(student), "fp32", device="cpu", zero3=distill.deepspeed_config(settings, world, "fp32"))
    whole = dict(load_lm(Path(student), "fp32", device="cpu").named_parameters())
    report = {"rank": rank, "local_numel": sum(p.numel() for p in model.parameters()),
              "partition_numel": sum(p.ds_tensor.numel() for p in model.parameters()),
              "full_numel": sum(p.numel() for p in whole.values()), "differing_weights": 0}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            report["differing_weights"] += not torch.equal(param.data, whole[name].data)
    del model, whole

    loop, snapshot = distill.run_training_loop, distill.trained_state

    def watched_loop(setup, *args):
        best = loop(setup, *args)
        coordinator = setup.engine.optimizer.parameter_offload.get_param_coordinator()
        report["trace_complete"] = coordinator.is_complete_trace()
        return best

    def watched_snapshot(engine, zero_stage, at_rank):
        copy = snapshot(engine, zero_stage, at_rank)
        report.setdefault("kept_tensors", []).append(len(copy))
        return copy

    distill.run_training_loop, distill.trained_state = watched_loop, watched_snapshot
    summary = distill.train_expert(settings, rank, world)
    report.update(first_loss=summary.first_loss, final_loss=summary.final_loss, steps=summary.steps)
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(2, free_port, sys.argv[1], sys.argv[2]), nprocs=2)
