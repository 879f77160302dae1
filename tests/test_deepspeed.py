"""The distill loop under each ZeRO stage, in-process (a one-rank gloo group, as Ray Train makes)."""
from __future__ import annotations

import pytest
import safetensors.torch

from modecotd.distill import DistillSettings, train_expert
from modecotd.tasks.generators import generate


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_saves_a_full_adapter(process_group, tiny_model_dir, tmp_path, stage):
    from peft import PeftModel

    from modecotd.models import load_lm

    rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", 8, seed=0, size=2)]
    settings = DistillSettings(student_dir=str(tiny_model_dir), dtype="fp32", kind="yes_no", rows=rows,
                               output_dir=str(tmp_path), lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4,
                               epochs=2, zero_stage=stage, max_length=160)
    summary = train_expert(settings, rank=0, world_size=1)
    assert summary.zero_stage == stage
    assert summary.final_loss < summary.first_loss
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 8 and all(t.numel() > 0 and t.abs().sum() > 0 for t in tensors.values())
    model = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(tmp_path))
    assert sum("lora_" in name for name, _ in model.named_parameters()) == 8


class FolderCheckpoints:
    """Checkpoints in numbered folders under ``root``, as Ray Train keeps them."""

    def __init__(self, root):
        self.root = root
        self.saved_at: list[int] = []

    def latest(self):
        import contextlib

        folders = sorted(self.root.glob("checkpoint_*"))
        return contextlib.nullcontext(folders[-1] if folders else None)

    def save(self, metrics, write):
        folder = self.root / f"checkpoint_{len(self.saved_at):04d}"
        folder.mkdir(parents=True)
        write(folder)
        self.saved_at.append(metrics["step"])


def _settings(tiny_model_dir, output_dir, **changes) -> DistillSettings:
    rows = [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", 12, seed=0, size=2)]
    settings = dict(student_dir=str(tiny_model_dir), dtype="fp32", kind="yes_no", rows=rows,
                    output_dir=str(output_dir), lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4,
                    epochs=2, zero_stage=2, max_length=160, seed=3)
    settings.update(changes)
    return DistillSettings(**settings)


class Crash(Exception):
    pass


@pytest.mark.parametrize("stage", [2, 3])
def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_adapter(process_group, tiny_model_dir, tmp_path,
                                                                     stage):
    undisturbed = tmp_path / "undisturbed"
    undisturbed.mkdir()
    reference = train_expert(_settings(tiny_model_dir, undisturbed, zero_stage=stage), 0, 1)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    checkpoints = FolderCheckpoints(tmp_path / "checkpoints")
    settings = _settings(tiny_model_dir, resumed, zero_stage=stage, checkpoint_every=2)

    def crash_at_step_5(metrics):
        if metrics["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train_expert(settings, 0, 1, report=crash_at_step_5, checkpoints=checkpoints)
    assert checkpoints.saved_at == [2, 4]
    summary = train_expert(settings, 0, 1, checkpoints=checkpoints)
    assert summary.steps == reference.steps == 6
    assert summary.losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-5)
    before = safetensors.torch.load_file(undisturbed / "adapter_model.safetensors")
    after = safetensors.torch.load_file(resumed / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert (before[name] - after[name]).abs().max() < 1e-5, name


class Planted:
    """A pickle that would run code when loaded: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(process_group, tiny_model_dir, tmp_path):
    import torch

    from modecotd.errors import UserError

    checkpoints = FolderCheckpoints(tmp_path / "checkpoints")
    settings = _settings(tiny_model_dir, tmp_path / "out", checkpoint_every=2)
    (tmp_path / "out").mkdir()

    def crash_at_step_3(metrics):
        if metrics["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train_expert(settings, 0, 1, report=crash_at_step_3, checkpoints=checkpoints)
    [optimizer_state] = (tmp_path / "checkpoints").rglob("*optim_states.pt")
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": Planted(marker)}, optimizer_state)  # someone with write access to storage
    with pytest.raises(UserError, match="would run pickled code"):
        train_expert(settings, 0, 1, checkpoints=checkpoints)
    assert not marker.exists()


def test_gradient_accumulation_counts_optimizer_steps(process_group, tiny_model_dir, tmp_path, monkeypatch):
    from modecotd import distill

    read_backs = []  # micro-steps read from the device at each read-back: once per optimizer step

    def spy(unread, state):
        read_backs.append(len(unread))
        real_read_back(unread, state)

    real_read_back = distill.read_back
    monkeypatch.setattr(distill, "read_back", spy)
    summary = train_expert(_settings(tiny_model_dir, tmp_path, gradient_accumulation=2), 0, 1)
    assert summary.gradient_accumulation == 2
    assert summary.steps == 6 and len(summary.losses) == 12  # micro-batches of 2, optimizer batch 4
    assert read_backs == [2] * 6 + [0]  # the last call finds nothing left
    assert summary.final_loss < summary.first_loss


def test_gradient_checkpointing_trains_with_the_same_losses(process_group, tiny_model_dir, tmp_path, monkeypatch):
    from modecotd import distill

    layer_calls = []  # forwards inside the first decoder layer: twice per micro-step when they are recomputed

    def spy(model, lora):
        real_enable(model, lora)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) and lora
        # a pre-hook: torch stops a recomputation once it has every tensor backward needs
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *args: layer_calls.append(1))

    real_enable = distill.enable_gradient_checkpointing
    monkeypatch.setattr(distill, "enable_gradient_checkpointing", spy)
    plain = train_expert(_settings(tiny_model_dir, tmp_path / "plain", epochs=1), 0, 1)
    assert layer_calls == []  # off by default
    recomputed = train_expert(_settings(tiny_model_dir, tmp_path / "checkpointed", epochs=1,
                                        gradient_checkpointing=True), 0, 1)
    assert len(layer_calls) == 2 * len(recomputed.losses) == 2 * 3
    assert recomputed.losses[0] == plain.losses[0]
    # the same dropout masks are replayed in the recomputation, so the updates and later losses match too
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert (tmp_path / "checkpointed" / "adapter_model.safetensors").is_file()


def test_validation_loss_and_early_stopping(process_group, tiny_model_dir, tmp_path):
    settings = _settings(tiny_model_dir, tmp_path, validation_fraction=0.25, eval_every=1, epochs=20,
                         learning_rate=0.5, early_stopping_patience=2)
    summary = train_expert(settings, 0, 1)
    assert summary.validation_examples == 3 and summary.examples == 9
    assert summary.stopped_early and summary.steps < summary.planned_steps
    steps = [step for step, _ in summary.validation_losses]
    assert steps == list(range(1, summary.steps + 1))
    assert summary.best_validation_loss == min(loss for _, loss in summary.validation_losses)


def test_optimizer_offload_to_cpu_trains(process_group, tiny_model_dir, tmp_path):
    summary = train_expert(_settings(tiny_model_dir, tmp_path, offload_optimizer=True), 0, 1)
    assert summary.final_loss < summary.first_loss
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_zero3_on_two_ranks_builds_the_student_partitioned_prefetches_and_keeps_one_copy(tiny_model_dir, tmp_path):
    """ZeRO-3 on two gloo ranks: the student is built partitioned (each rank holds half of it and
    never the whole, with the same weights as a whole load), the loss runs through the engine's own
    forward (DeepSpeed's parameter trace completes, so it can prefetch; calling the base model
    directly left it incomplete), and only rank 0 keeps a host copy of the trained weights."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tests.zero3_two_ranks", str(tiny_model_dir), str(tmp_path)],
                          cwd=root, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert set(ranks) == {0, 1}
    for report in ranks.values():
        assert report["local_numel"] == 0  # parameters live in their partitions only
        assert report["partition_numel"] <= report["full_numel"] // 2 + 64
        assert report["differing_weights"] == 0
        assert report["trace_complete"] is True
        assert report["steps"] > 0 and report["final_loss"] < report["first_loss"]
    assert all(n > 0 for n in ranks[0]["kept_tensors"]) and set(ranks[1]["kept_tensors"]) == {0}
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_under_zero3_saves_the_whole_trained_model(process_group, tiny_model_dir, tmp_path):
    """Every weight trainable, the student built partitioned: the weights gathered one at a time on
    rank 0 make a model folder that loads with from_pretrained and differs from the student."""
    import torch

    from modecotd.models import load_lm

    summary = train_expert(_settings(tiny_model_dir, tmp_path, zero_stage=3, full_finetune=True, learning_rate=1e-3,
                                     epochs=1), rank=0, world_size=1)
    assert summary.zero_stage == 3 and summary.steps > 0
    trained, student = load_lm(tmp_path, device="cpu"), load_lm(tiny_model_dir, device="cpu")
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
