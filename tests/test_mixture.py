"""Mixtures of LoRA experts, checked numerically on a tiny model with random experts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modecotd.distill import DistillSettings, add_lora, training_attention
from modecotd.mixture import Mixture, export_adapter, read_adapter
from modecotd.models import load_lm
from modecotd.tasks.schema import AnswerKind

ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "rationale": f"{a} + {b} = {a + b}."}
        for a, b in [(1, 2), (3, 4), (5, 6)]]
W = [0.7, -1.3]


def make_expert(model_dir: Path, out: Path, seed: int, alpha: float = 8) -> Path:
    torch.manual_seed(seed)
    settings = DistillSettings(student_dir=str(model_dir), dtype="fp32", kind="number", rows=[], output_dir=str(out),
                               lora_r=4, lora_alpha=alpha)
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
    # different alphas: delta scales each expert by its own alpha / r
    return {name: make_expert(tiny_model_dir, root / name, seed, alpha)
            for seed, (name, alpha) in enumerate([("alpha", 8), ("beta", 4)])}


@pytest.fixture(scope="module")
def same_alpha_experts(experts, tiny_model_dir, tmp_path_factory):
    return {"alpha": experts["alpha"], "gamma": make_expert(tiny_model_dir, tmp_path_factory.mktemp("g") / "g", 7)}


@pytest.fixture(scope="module")
def batch(tiny_model_dir, same_alpha_experts):
    return Mixture(tiny_model_dir, same_alpha_experts).batch_for(ROWS, AnswerKind.NUMBER, 128)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def layer_update(mixture, path, x):
    """The mixed layer's output minus the frozen layer's output."""
    layer = mixture.layers[path]
    with torch.no_grad():
        return layer(x) - layer.base(x)


def expert_update(tensors, config, path, x):
    a = tensors[f"base_model.model.{path}.lora_A.weight"]
    b = tensors[f"base_model.model.{path}.lora_B.weight"]
    return x @ a.T @ b.T, a, b, config["lora_alpha"] / config["r"]


@pytest.mark.parametrize("method", ["lorahub", "delta"])
def test_zero_weights_reproduce_the_base_model_exactly(tiny_model_dir, experts, same_alpha_experts, batch, method):
    mixture = Mixture(tiny_model_dir, same_alpha_experts if method == "lorahub" else experts, method)
    mixture.set_weights([0.0, 0.0])
    base = load_lm(tiny_model_dir, attention=training_attention())  # the mixture's own choice on this device
    assert torch.equal(logits(mixture.model, batch), logits(base, batch))


def test_delta_is_the_weighted_sum_of_the_experts_updates(tiny_model_dir, experts):
    mixture = Mixture(tiny_model_dir, experts, "delta")
    mixture.set_weights(W)
    x = torch.randn(3, 5, 64)
    for path in mixture.layers:
        expected = 0
        for w, name in zip(W, mixture.names):
            config, tensors = read_adapter(experts[name])
            update, _, _, scale = expert_update(tensors, config, path, x)
            expected = expected + w * scale * update
        torch.testing.assert_close(layer_update(mixture, path, x), expected, rtol=1e-4, atol=1e-5)
    assert len(mixture.layers) == 4  # 2 layers x (q, v)


def test_lorahub_sums_a_and_b_separately(tiny_model_dir, same_alpha_experts):
    mixture = Mixture(tiny_model_dir, same_alpha_experts, "lorahub")
    mixture.set_weights(W)
    x = torch.randn(3, 5, 64)
    for path in mixture.layers:
        parts = [expert_update(*reversed(read_adapter(same_alpha_experts[n])), path, x) for n in mixture.names]
        a = sum(w * p[1] for w, p in zip(W, parts))
        b = sum(w * p[2] for w, p in zip(W, parts))
        expected = x @ a.T @ b.T * parts[0][3]
        torch.testing.assert_close(layer_update(mixture, path, x), expected, rtol=1e-4, atol=1e-5)
        exact = sum(w * p[3] * p[0] for w, p in zip(W, parts))  # the cross terms make lorahub differ from delta
        assert not torch.allclose(expected, exact, atol=1e-3)


def test_lorahub_refuses_experts_with_different_alphas(tiny_model_dir, experts):
    with pytest.raises(ValueError, match="lora_alpha"):
        Mixture(tiny_model_dir, experts, "lorahub")


def test_experts_of_other_ranks_or_other_base_models_are_refused(tiny_model_dir, experts, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    ranked = shutil.copytree(experts["alpha"], tmp_path / "ranked")
    config = json.loads((ranked / "adapter_config.json").read_text())
    (ranked / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="differ in r: 4 vs 8"):
        Mixture(tiny_model_dir, {"alpha": experts["alpha"], "ranked": ranked}, "delta")
    other = shutil.copytree(experts["alpha"], tmp_path / "other")  # as if its base had wider layers
    tensors = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=-1).contiguous() if "lora_A" in k else v for k, v in tensors.items()},
              str(other / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="trained on different base models"):
        Mixture(tiny_model_dir, {"alpha": experts["alpha"], "other": other}, "delta")


def test_a_single_expert_at_weight_one_is_that_expert(tiny_model_dir, experts, batch):
    from peft import PeftModel

    expert = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(experts["alpha"]))
    for method in ("lorahub", "delta"):
        mixture = Mixture(tiny_model_dir, {"alpha": experts["alpha"]}, method)
        mixture.set_weights([1.0])
        torch.testing.assert_close(logits(mixture.model, batch), logits(expert, batch))


@pytest.mark.parametrize("method", ["lorahub", "delta"])
def test_exported_adapter_gives_the_live_mixtures_logits(tiny_model_dir, experts, same_alpha_experts, batch,
                                                          tmp_path, method):
    from peft import PeftModel

    chosen = same_alpha_experts if method == "lorahub" else experts
    mixture = Mixture(tiny_model_dir, chosen, method)
    mixture.set_weights(W)
    folder = export_adapter(chosen, method, W, tmp_path / "merged")
    merged = PeftModel.from_pretrained(load_lm(tiny_model_dir), str(folder))
    torch.testing.assert_close(logits(merged, batch), logits(mixture.model, batch), rtol=1e-4, atol=1e-4)


def test_candidates_in_one_batch_match_one_at_a_time(tiny_model_dir, experts, batch):
    mixture = Mixture(tiny_model_dir, experts, "delta")
    candidates = torch.tensor([[0.0, 0.0], W, [2.0, 1.0]])
    batched = mixture.candidate_losses(batch, candidates, max_rows=6)  # two forwards: 2 + 1 candidates
    one_by_one = []
    for candidate in candidates:
        mixture.set_weights(candidate)
        one_by_one.append(mixture.few_shot_loss(batch))
    assert batched == pytest.approx(one_by_one, rel=1e-5)
    assert len(set(round(x, 4) for x in batched)) == 3


def test_candidate_forwards_default_to_the_devices_row_cap(tiny_model_dir, experts, batch):
    from modecotd.mixture import ROWS_PER_FORWARD

    mixture = Mixture(tiny_model_dir, experts, "delta")
    assert mixture.device.type == "cpu"
    rows_per_forward = []
    hook = mixture.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: rows_per_forward.append(args[0].shape[0]))
    try:
        candidates = torch.rand(12, 2)  # 12 candidates x 3 rows = 36 rows: more than the CPU's 32
        assert mixture.candidate_losses(batch, candidates) == pytest.approx(
            mixture.candidate_losses(batch, candidates, max_rows=36), rel=1e-5)
    finally:
        hook.remove()
    assert ROWS_PER_FORWARD.resolve("auto", "cpu") == 32 and ROWS_PER_FORWARD.resolve("auto", "cuda") > 32
    assert rows_per_forward == [30, 6, 36]  # 10 + 2 candidates by default on a CPU; one forward at 36


def test_gradient_matches_finite_differences(tiny_model_dir, same_alpha_experts, batch):
    mixture = Mixture(tiny_model_dir, same_alpha_experts, "lorahub")
    loss, gradient = mixture.loss_and_gradient(batch, W)
    mixture.set_weights(W)
    assert loss == pytest.approx(mixture.few_shot_loss(batch), rel=1e-5)
    step = 0.05  # central differences: error O(step^2), well above float32 rounding of the loss
    for i in range(2):
        up, down = list(W), list(W)
        up[i] += step
        down[i] -= step
        mixture.set_weights(up)
        plus = mixture.few_shot_loss(batch)
        mixture.set_weights(down)
        minus = mixture.few_shot_loss(batch)
        assert gradient[i] == pytest.approx((plus - minus) / (2 * step), rel=0.05, abs=2e-5)


def test_gate_learns_routers_with_student_and_experts_frozen(tiny_model_dir, experts, batch, tmp_path):
    mixture = Mixture(tiny_model_dir, experts, "delta")
    frozen = {n: p.detach().clone() for n, p in mixture.model.named_parameters()}
    buffers = {n: b.clone() for n, b in mixture.model.named_buffers()}
    mixture.set_weights([0.5, 0.5])
    uniform = mixture.few_shot_loss(batch)
    steps = []
    losses = mixture.fit_gate(batch, steps=30, learning_rate=0.05, on_step=lambda: steps.append(len(steps)))
    assert len(losses) == len(steps) == 30  # progress hears of every step as it ends
    assert losses[0] == pytest.approx(uniform, rel=1e-5)  # zero-initialised routers: 1/n each, the delta average
    assert losses[-1] < losses[0]
    for name, param in mixture.model.named_parameters():
        if ".router." not in name:
            assert torch.equal(param, frozen[name]), name
    assert all(torch.equal(b, buffers[n]) for n, b in mixture.model.named_buffers())
    weights = mixture.mean_gate_weights(batch)
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0) and weights != pytest.approx([0.5, 0.5])

    path = mixture.save_routers(tmp_path / "routers.safetensors")
    again = Mixture(tiny_model_dir, experts, "gate")
    again.load_routers(path)
    torch.testing.assert_close(logits(again.model, batch), logits(mixture.model, batch))
    with pytest.raises(ValueError, match="no single merged adapter"):
        export_adapter(experts, "gate", [0.5, 0.5], tmp_path / "x")


def test_one_loaded_student_serves_systems_in_turn_and_is_left_unchanged(tiny_model_dir, experts, batch):
    from modecotd.evaluate import attach_system, load_system
    from modecotd.plan import SystemSpec

    student = load_lm(tiny_model_dir)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plain = logits(student, batch)
    systems = [SystemSpec("expert", adapter=str(experts["alpha"])), SystemSpec("expert", adapter=str(experts["beta"])),
               SystemSpec("mixture", experts={k: str(v) for k, v in experts.items()},
                          weights={"alpha": W[0], "beta": W[1]}, method="delta"),
               SystemSpec("base")]
    for system in systems:
        model, detach = attach_system(student, tiny_model_dir, system)
        expected = logits(load_system(tiny_model_dir, "fp32", system), batch)  # loaded afresh from disk
        got = logits(model, batch)
        assert torch.allclose(got, expected, atol=1e-5)
        assert (system.kind == "base") == torch.allclose(got, plain, atol=1e-5)
        detach()
        assert torch.equal(logits(student, batch), plain)
        assert student.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
        assert not any("lora" in n or "Mixed" in type(m).__name__ for n, m in student.named_modules())


def test_experts_that_do_not_fit_leave_a_passed_in_student_untouched(tiny_model_dir, experts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(experts["alpha"], broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    last = sorted(tensors)[-1].rsplit(".lora_", 1)[0]  # one layer's LoRA goes missing: the last one wired
    kept = {k: v for k, v in tensors.items() if not k.startswith(last + ".")}
    save_file(kept, str(broken / "adapter_model.safetensors"))
    student = load_lm(tiny_model_dir)
    modules = [type(m) for m in student.modules()]
    with pytest.raises(ValueError, match="have no LoRA for|adapt different layers"):
        Mixture(tiny_model_dir, {"alpha": experts["alpha"], "broken": broken}, "delta", model=student)
    assert [type(m) for m in student.modules()] == modules
