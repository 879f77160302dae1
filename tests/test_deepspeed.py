"""The distill loop under each ZeRO stage, in-process (a one-rank gloo group, as Ray Train makes)."""
from __future__ import annotations

import os
import socket

import pytest
import safetensors.torch

from modecotd.distill import DistillSettings, train_expert
from modecotd.tasks.generators import generate


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_saves_a_full_adapter(process_group, tiny_model_dir, tmp_path, stage):
    from peft import PeftModel

    from modecotd.models import load_causal_lm

    rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", 8, seed=0, size=2)]
    settings = DistillSettings(student_dir=str(tiny_model_dir), dtype="fp32", kind="yes_no", rows=rows,
                               output_dir=str(tmp_path), lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4,
                               epochs=2, zero_stage=stage, max_length=160)
    summary = train_expert(settings, rank=0, world_size=1)
    assert summary["zero_stage"] == stage
    assert summary["final_loss"] < summary["first_loss"]
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 8 and all(t.numel() > 0 and t.abs().sum() > 0 for t in tensors.values())
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(tmp_path))
    assert sum("lora_" in name for name, _ in model.named_parameters()) == 8
