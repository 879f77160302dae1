"""Training data: loss on the target tokens only; every example once per epoch."""
from __future__ import annotations

import pytest

from modecotd import prompts
from modecotd.distill import collate, tokenize_rows, warmup_then_linear
from modecotd.losses import IGNORE_INDEX
from modecotd.models import load_tokenizer
from modecotd.tasks.schema import AnswerKind

ROW = {"question": "What is 2 + 3?", "answer": "5", "rationale": "2 + 3 = 5."}


def test_prompt_tokens_are_masked(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="right")
    (example,), too_long = tokenize_rows([ROW], AnswerKind.NUMBER, tokenizer, 512)
    assert too_long == 0
    n_prompt = len(tokenizer(prompts.student_prompt(ROW["question"], AnswerKind.NUMBER),
                             add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    target = tokenizer.decode(example["labels"][n_prompt:])
    assert target.startswith(" 2 + 3 = 5.\n\n-->\n\n5 END")
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_too_long_rows_are_counted_not_kept(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="right")
    examples, too_long = tokenize_rows([ROW, {**ROW, "rationale": "word " * 400}], AnswerKind.NUMBER, tokenizer, 64)
    assert len(examples) == 1 and too_long == 1


def test_collate_pads_right_and_ignores_padding():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_an_epoch_keeps_every_example_once_in_an_order_its_seed_fixes():
    from modecotd.distill import epoch_batches

    examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in range(1, 42)]
    first = epoch_batches(examples, 4, seed=3, epoch=0)
    assert [len(b) for b in first] == [4] * 10 + [1]
    assert sorted(len(e["input_ids"]) for b in first for e in b) == list(range(1, 42))
    assert first == epoch_batches(examples, 4, seed=3, epoch=0)  # a resumed run sees the same batches
    assert first != epoch_batches(examples, 4, seed=3, epoch=1) != epoch_batches(examples, 4, seed=4, epoch=0)
    assert [len(e["input_ids"]) for b in first for e in b] != list(range(1, 42))


def test_schedule_warms_up_then_decays():
    factor = warmup_then_linear(100, 0.1)
    assert factor(0) < factor(5) < factor(9) == 1.0
    assert factor(50) > factor(90) > factor(99) > 0


def test_read_back_moves_losses_and_token_counts_in_one_go_unchanged():
    import torch

    from modecotd.distill import LoopState, read_back

    losses = [torch.tensor(x, dtype=torch.float32) for x in (2.718281828, 1.0 / 3.0, 0.1)]
    counts = [torch.tensor(n) for n in (17, 0, 123456789)]
    state = LoopState(losses=[5.0], target_tokens=10)
    unread = list(zip(losses, counts))
    read_back(unread, state)
    assert unread == []
    # exactly what float(loss) and int(count) per micro-step gave
    assert state.losses == [5.0] + [float(x) for x in losses]
    assert state.target_tokens == 10 + 17 + 0 + 123456789
    read_back(unread, state)  # nothing unread: nothing changes
    assert len(state.losses) == 4


class _FakeEngine:
    """What save/load_training_state ask of a DeepSpeed engine."""

    def __init__(self):
        self.checkpoint_engine = type("CheckpointEngine", (), {})()  # load_without_pickle sets its load

    @property
    def device(self):  # an engine is on the GPU where there is one (pretended here)
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def save_checkpoint(self, folder, tag, exclude_frozen_parameters):
        pass

    def load_checkpoint(self, folder, tag, load_module_strict):
        pass


def _pretend_gpu(monkeypatch, cuda_state, restored):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": restored.append(new_state))


def test_checkpoints_keep_the_cuda_rng_state_on_a_gpu(tmp_path, monkeypatch):
    import torch

    from modecotd.distill import TRAINER_STATE, LoopState, load_training_state, save_training_state

    cuda_state, restored = torch.arange(16, dtype=torch.uint8), []
    _pretend_gpu(monkeypatch, cuda_state, restored)
    save_training_state(_FakeEngine(), tmp_path, 1, LoopState(micro_step=6))
    saved = torch.load(tmp_path / TRAINER_STATE.format(rank=1), weights_only=False)
    assert torch.equal(saved["cuda_rng"], cuda_state)
    assert load_training_state(_FakeEngine(), tmp_path, 1).micro_step == 6
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)


def test_checkpoints_without_a_cuda_rng_state_still_load(tmp_path, monkeypatch):
    import torch

    from modecotd.distill import TRAINER_STATE, LoopState, load_training_state, save_training_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    save_training_state(_FakeEngine(), tmp_path, 0, LoopState(micro_step=4))  # written on a CPU
    assert "cuda_rng" not in torch.load(tmp_path / TRAINER_STATE.format(rank=0), weights_only=False)
    restored: list = []
    _pretend_gpu(monkeypatch, torch.zeros(4, dtype=torch.uint8), restored)  # resumed on a GPU
    assert load_training_state(_FakeEngine(), tmp_path, 0).micro_step == 4
    assert restored == []


def test_a_cuda_rng_state_is_skipped_where_there_is_no_gpu(tmp_path, monkeypatch, caplog):
    import torch

    from modecotd.distill import LoopState, load_training_state, save_training_state

    restored: list = []
    _pretend_gpu(monkeypatch, torch.ones(4, dtype=torch.uint8), restored)
    save_training_state(_FakeEngine(), tmp_path, 0, LoopState(micro_step=2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert load_training_state(_FakeEngine(), tmp_path, 0).micro_step == 2
    assert restored == [] and "trains on no GPU" in caplog.text


def test_the_adapter_check_takes_a_fitting_adapter_and_refuses_one_that_does_not_fit(tiny_model_dir, tmp_path):
    """check_adapter builds the student on the meta device (no weights) and applies the adapter as
    PeftModel.from_pretrained would: an adapter saved from the student passes; one with a tensor of
    another shape, or a name the student has no slot for, is refused with the file named."""
    import safetensors.torch
    import torch

    from modecotd.distill import DistillSettings, add_lora, check_adapter
    from modecotd.models import load_lm

    model = add_lora(load_lm(tiny_model_dir), DistillSettings(student_dir=str(tiny_model_dir), dtype="fp32",
                                                              kind="number", rows=[], output_dir=""))
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = safetensors.torch.load_file(path)
    check_adapter(str(tmp_path), str(tiny_model_dir), len(saved))

    first = next(iter(saved))
    for broken in ({**saved, first: saved[first][:, :-1].contiguous()},  # another shape
                   {(k.replace("q_proj", "k_proj") if k == first else k): v for k, v in saved.items()}):  # no slot
        safetensors.torch.save_file(broken, path)
        with pytest.raises(RuntimeError, match="does not fit the student"):
            check_adapter(str(tmp_path), str(tiny_model_dir), len(saved))
