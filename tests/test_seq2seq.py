"""Seq2seq (encoder-decoder) students, like the paper's Flan-T5: tokenisation, loss, ZeRO
training, the mixer and generation, on a tiny T5."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from modecotd import prompts
from modecotd.distill import DistillSettings, collate, tokenize_rows, train_expert
from modecotd.losses import IGNORE_INDEX, target_loss
from modecotd.models import is_encoder_decoder, load_lm, load_tokenizer
from modecotd.tasks.generators import generate
from modecotd.tasks.schema import AnswerKind

ROW = {"question": "What is 2 + 3?", "answer": "5", "rationale": "2 + 3 = 5."}


def test_tiny_t5_is_an_encoder_decoder(tiny_t5_dir, tiny_model_dir):
    assert is_encoder_decoder(tiny_t5_dir) and is_encoder_decoder(load_lm(tiny_t5_dir))
    assert not is_encoder_decoder(tiny_model_dir)


def test_prompt_is_the_input_and_the_target_the_labels(tiny_t5_dir):
    tokenizer = load_tokenizer(tiny_t5_dir, padding_side="right")
    (example,), too_long = tokenize_rows([ROW], AnswerKind.NUMBER, tokenizer, 512, encoder_decoder=True)
    assert too_long == 0
    assert example["input_ids"] == tokenizer(prompts.student_prompt(ROW["question"], AnswerKind.NUMBER))["input_ids"]
    assert IGNORE_INDEX not in example["labels"] and example["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["labels"]).startswith(" 2 + 3 = 5.\n\n-->\n\n5 END")


def test_labels_pad_to_their_own_width_and_the_loss_is_the_models_own(tiny_t5_dir):
    model = load_lm(tiny_t5_dir)
    batch = collate([{"input_ids": list(range(5, 17)), "labels": [40, 41, 42]},
                     {"input_ids": list(range(30, 35)), "labels": [50, 51, 52, 53, 54, 55]}], pad_id=0)
    assert batch["input_ids"].shape == (2, 12) and batch["labels"].shape == (2, 6)
    assert batch["labels"][0].tolist() == [40, 41, 42, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    with torch.no_grad():
        expected = model(**batch).loss
        assert torch.allclose(target_loss(model, batch), expected, atol=1e-5)


def rows(n: int) -> list[dict]:
    return [{"question": e.question, "answer": e.answer, "rationale": e.rationale}
            for e in generate("coin_flip", n, seed=0, size=2)]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_a_seq2seq_expert_that_reloads(process_group, tiny_t5_dir, tmp_path, stage):
    from peft import PeftModel

    settings = DistillSettings(student_dir=str(tiny_t5_dir), dtype="fp32", kind="yes_no", rows=rows(8),
                               output_dir=str(tmp_path), lora_r=4, lora_alpha=8, learning_rate=5e-3, batch_size=4,
                               epochs=2, zero_stage=stage, max_length=160)
    summary = train_expert(settings, rank=0, world_size=1)
    assert summary.final_loss < summary.first_loss
    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    # q and v of each attention block: encoder self (2 layers), decoder self and cross (2 layers each)
    assert len(tensors) == 6 * 2 * 2 and all(t.abs().sum() > 0 for t in tensors.values())
    assert any(".q." in key for key in tensors) and any("EncDecAttention" in key for key in tensors)
    model = PeftModel.from_pretrained(load_lm(tiny_t5_dir), str(tmp_path))
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"


def test_mixer_and_generation_work_on_a_seq2seq_student(tiny_t5_dir, tmp_path):
    from peft import PeftModel

    from modecotd.distill import add_lora, training_attention
    from modecotd.evaluate import predict
    from modecotd.mixture import Mixture
    from modecotd.tasks.schema import Example

    experts = {}
    for seed, name in enumerate(["alpha", "beta"]):
        torch.manual_seed(seed)
        settings = DistillSettings(student_dir=str(tiny_t5_dir), dtype="fp32", kind="number", rows=[],
                                   output_dir="", lora_r=4, lora_alpha=8)
        model = add_lora(load_lm(tiny_t5_dir), settings)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.normal_(0, 0.2)
        model.save_pretrained(tmp_path / name)
        experts[name] = tmp_path / name
    mixer = Mixture(tiny_t5_dir, experts)
    batch = mixer.batch_for([ROW, {**ROW, "rationale": "Two plus three makes five."}], AnswerKind.NUMBER, 128)
    mixer.set_weights([0.0, 0.0])
    base = load_lm(tiny_t5_dir, attention=training_attention())  # the mixture's own choice on this device
    with torch.no_grad():
        assert torch.equal(mixer.model(**batch).logits, base(**batch).logits)
    zero = mixer.few_shot_loss(batch)
    assert len(mixer.layers) == 6 * 2  # q and v of encoder self, decoder self and cross attention
    mixer.set_weights([1.0, 0.0])
    expert = PeftModel.from_pretrained(load_lm(tiny_t5_dir, attention=training_attention()), str(experts["alpha"]))
    with torch.no_grad():
        torch.testing.assert_close(mixer.model(**batch).logits, expert(**batch).logits)
    assert mixer.few_shot_loss(batch) != pytest.approx(zero)

    tokenizer = load_tokenizer(tiny_t5_dir)
    examples = [Example(question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
    texts = predict(base, tokenizer, examples, AnswerKind.NUMBER, batch_size=1, max_new_tokens=6)
    assert len(texts) == 3
    for example, text in zip(examples, texts):
        inputs = tokenizer(prompts.student_prompt(example.question, AnswerKind.NUMBER), return_tensors="pt")
        greedy = base.generate(**inputs, max_new_tokens=6, do_sample=False)
        # the decoder's output after its start token; a causal LM's output would begin with the prompt
        assert text == tokenizer.decode(greedy[0, 1:], skip_special_tokens=True) and text


def test_a_model_without_sdpa_is_loaded_with_eager_attention(tiny_t5_dir, monkeypatch):
    """Training asks for SDPA on a GPU; T5 under older transformers raises for it. load_lm then
    loads the model with eager attention instead of failing (here: the refusal is simulated)."""
    from transformers import AutoModelForSeq2SeqLM

    from modecotd.models import load_lm

    asked = []
    real = AutoModelForSeq2SeqLM.from_pretrained

    def older_transformers(*args, **kwargs):
        asked.append(kwargs.get("attn_implementation"))
        if kwargs.get("attn_implementation") == "sdpa":
            raise ValueError("T5ForConditionalGeneration does not support an attention implementation through "
                             "torch.nn.functional.scaled_dot_product_attention yet.")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSeq2SeqLM, "from_pretrained", older_transformers)
    model = load_lm(tiny_t5_dir, attention="sdpa", device="cpu")
    assert asked == ["sdpa", "eager"] and model.config._attn_implementation == "eager"

    def broken(*args, **kwargs):
        raise ValueError("something else is wrong")

    monkeypatch.setattr(AutoModelForSeq2SeqLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match="something else"):
        load_lm(tiny_t5_dir, attention="sdpa", device="cpu")
