"""The LoraHub mixer, checked numerically on a tiny model with two random experts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modecotd.distill import DistillSettings, add_lora
from modecotd.mixture import LoraHubMixer, search_weights
from modecotd.models import load_lm
from modecotd.tasks.schema import AnswerKind

ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "rationale": f"{a} + {b} = {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6)]]


def make_expert(model_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    settings = DistillSettings(student_dir=str(model_dir), dtype="fp32", kind="number", rows=[], output_dir=str(out),
                               lora_r=4, lora_alpha=8)
    model = add_lora(load_lm(model_dir), settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def experts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {name: make_expert(tiny_model_dir, root / name, seed) for seed, name in enumerate(["alpha", "beta"])}


@pytest.fixture(scope="module")
def mixer(tiny_model_dir, experts):
    return LoraHubMixer(tiny_model_dir, experts)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_zero_weights_reproduce_the_base_model(tiny_model_dir, mixer):
    batch = mixer.batch_for(ROWS, AnswerKind.NUMBER, 128)
    mixer.set_weights([0.0, 0.0])
    base = load_lm(tiny_model_dir)
    assert torch.equal(logits(mixer.model, batch), logits(base, batch))


def test_lorahub_sums_a_and_b_separately(mixer, experts):
    from modecotd.mixture import read_adapter

    w = [0.7, -1.3]
    mixer.set_weights(w)
    tensors = {name: read_adapter(path)[1] for name, path in experts.items()}
    checked = 0
    for slot, param in mixer.slots.items():
        key = slot.replace(".default.", ".")
        expected = w[0] * tensors["alpha"][key] + w[1] * tensors["beta"][key]
        torch.testing.assert_close(param.detach(), expected)
        checked += 1
    assert checked == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # The effective update is (sum w B)(sum w A), which differs from sum w (B A): the paper's cross-terms.
    a_key = next(k for k in mixer.slots if "q_proj.lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    mixed = mixer.slots[b_key].detach() @ mixer.slots[a_key].detach()
    a, b = a_key.replace(".default.", "."), b_key.replace(".default.", ".")
    exact = sum(wi * tensors[n][b] @ tensors[n][a] for wi, n in zip(w, ["alpha", "beta"]))
    assert not torch.allclose(mixed, exact)


def test_single_expert_weight_one_matches_the_expert(tiny_model_dir, mixer, experts):
    from peft import PeftModel

    batch = mixer.batch_for(ROWS, AnswerKind.NUMBER, 128)
    mixer.set_weights([1.0, 0.0])
    expert = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(experts["alpha"]))
    torch.testing.assert_close(logits(mixer.model, batch), logits(expert, batch))


def test_few_shot_loss_changes_with_weights(mixer):
    batch = mixer.batch_for(ROWS, AnswerKind.NUMBER, 128)
    mixer.set_weights([0.0, 0.0])
    zero = mixer.few_shot_loss(batch)
    mixer.set_weights([2.0, 2.0])
    assert mixer.few_shot_loss(batch) != pytest.approx(zero)


def test_search_weights_minimises_a_known_function():
    target = [1.0, -2.0]
    result = search_weights(lambda w: sum((a - b) ** 2 for a, b in zip(w, target)), 2,
                            budget=60, bound=3.0, seed=0, l1=0.0)
    assert len(result.history) == 60
    assert result.history[0]["weights"] == [0.0, 0.0]  # the search starts at w = 0, like the paper
    assert result.objective < 0.5
    assert result.objective == min(h["objective"] for h in result.history)


def test_l1_penalty_is_added():
    result = search_weights(lambda w: 0.0, 1, budget=5, bound=3.0, seed=0, l1=0.5)
    for h in result.history:
        assert h["objective"] == pytest.approx(0.5 * abs(h["weights"][0]))
