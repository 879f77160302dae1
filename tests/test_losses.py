import pytest
import torch
import torch.nn.functional as F

from modecotd import losses
from modecotd.distill import DistillSettings, add_lora, collate
from modecotd.losses import IGNORE_INDEX, plain_head_lm, target_loss, token_cross_entropy, token_losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch_in_values_and_gradients_across_chunks(dtype, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk: 7 rows span three chunks
    torch.manual_seed(0)
    logits = (torch.randn(7, 50) * 3).to(dtype)
    targets = torch.tensor([4, IGNORE_INDEX, 0, 49, 7, IGNORE_INDEX, 12])
    weights = torch.rand(7)

    ours_in = logits.clone().requires_grad_(True)
    ours = token_cross_entropy(ours_in, targets)
    (ours * weights).sum().backward()
    ref_in = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (ref * weights).sum().backward()

    assert torch.allclose(ours, ref, atol=1e-5)
    assert ours[1] == 0 and ours[5] == 0
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert ours_in.grad.dtype == dtype
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), atol=tolerance)
    assert ours_in.grad[1].abs().sum() == 0
    assert torch.equal(ours_in.detach(), logits)  # the saved logits are not overwritten by the backward


BATCH = [{"input_ids": list(range(5, 17)), "labels": [IGNORE_INDEX] * 7 + list(range(12, 17))},
         {"input_ids": list(range(30, 39)), "labels": [IGNORE_INDEX] * 4 + list(range(34, 39))}]


def test_target_loss_equals_the_models_own_loss(tiny_model_dir):
    from modecotd.models import load_lm

    model = load_lm(tiny_model_dir)
    batch = collate(BATCH, pad_id=0)
    assert plain_head_lm(model) is model  # the tiny Llama takes the target-positions-only path
    assert torch.allclose(target_loss(model, batch), model(**batch).loss, atol=1e-5)


def test_target_positions_only_gives_the_full_forwards_losses_and_lora_gradients(tiny_model_dir, monkeypatch):
    from modecotd.models import load_lm

    model = add_lora(load_lm(tiny_model_dir), DistillSettings(student_dir=str(tiny_model_dir), dtype="fp32",
                                                              kind="number", rows=[], output_dir="", lora_dropout=0.0))
    assert plain_head_lm(model) is model.get_base_model()

    class Engine(torch.nn.Module):  # what DeepSpeed's engine looks like from outside: the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = {"train_micro_batch_size_per_gpu": 2}

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert plain_head_lm(Engine(model)) is model.get_base_model()

    batch = collate(BATCH, pad_id=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # LoRA's B starts at zero; give the adapter an effect
        torch.nn.init.normal_(p, std=0.05)

    def run():
        model.zero_grad()
        values, mask = token_losses(model, batch)
        (values * mask).sum().backward()
        return values.detach(), mask, [p.grad.clone() for p in trainable]

    fast_values, fast_mask, fast_grads = run()
    monkeypatch.setattr(losses, "PLAIN_HEAD_MODEL_TYPES", frozenset())
    assert plain_head_lm(model) is None
    full_values, full_mask, full_grads = run()

    assert fast_values.shape == full_values.shape == (2, 11)
    assert torch.equal(fast_mask, full_mask)
    assert torch.allclose(fast_values, full_values, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_grads, full_grads))
    assert any(g.abs().sum() > 0 for g in fast_grads)


def test_cross_entropy_chunks_are_sized_for_the_device():
    """16 MiB of fp32 logits per chunk on a CPU (cache-sized); on a GPU a pass over 1024 targets of a
    152k-token vocabulary takes a single chunk instead of ~40 small kernels."""
    cpu, gpu = losses.chunk_elements(torch.device("cpu")), losses.chunk_elements(torch.device("cuda"))
    assert cpu * 4 == 16 * 2**20
    vocabulary = 152_000
    assert -(-1024 // (gpu // vocabulary)) == 1 and -(-1024 // (cpu // vocabulary)) > 30
