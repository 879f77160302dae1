"""Stage 4 as a library: build a system (base, expert, mixture), decode greedily, score.

Scores kept per row: strict correctness (our extractor), the reference's lenient correctness,
answer-format compliance, for free-text answers partial credit, and for yes/no and choice answers
the likelihood reading (:mod:`modecotd.likelihood`). The majority baseline
(always answer the train split's most common answer) is computed beside them.
"""
from __future__ import annotations

import collections
from pathlib import Path

from modecotd import prompts
from modecotd.artifacts import local_folder
from modecotd.generation import generate_texts
from modecotd.plan import SystemSpec
from modecotd.tasks.answers import END_MARK, extract_answer, has_answer_format, is_correct, partial_credit, \
    reference_is_correct
from modecotd.tasks.schema import AnswerKind, Example


def load_system(student_dir: Path, dtype: str, system: SystemSpec):
    """A generation-ready model for ``system``, each of whose units is fetched to this node.

    Adapters stay unmerged, the way training computed them (a separate LoRA path beside the bf16
    weights); merging would round the update into the bf16 weights. ``dtype`` may be ``auto`` (see
    :mod:`modecotd.precision`); the model is loaded straight onto the GPU Ray reserved, if any."""
    from modecotd.models import load_lm

    if system.kind == "full":
        return load_lm(local_folder(system.model), dtype)
    model, _ = attach_system(load_lm(student_dir, dtype), student_dir, system)
    return model


def attach_system(student, student_dir: Path, system: SystemSpec):
    """``system`` built in place on ``student``, a student already loaded (any system but "full");
    returns the model and a function that takes the system off again, leaving ``student`` as it was,
    so that one loaded student serves many systems in turn."""
    kind = system.kind
    if kind == "base":
        return student, lambda: None
    if kind == "expert":
        from peft import PeftModel

        from modecotd.models import require_safetensors
        from modecotd.units import TrainingFiles

        adapter = local_folder(system.adapter)
        require_safetensors(adapter, TrainingFiles.ADAPTER_WEIGHTS)
        model = PeftModel.from_pretrained(student, str(adapter)).eval()
        return model, model.unload
    if kind == "mixture":
        from modecotd.mixture import Mixture
        from modecotd.units import MixtureFiles

        experts = {name: local_folder(where) for name, where in system.experts.items()}
        mixture = Mixture(student_dir, experts, system.method, model=student)
        if mixture.method == "gate":
            mixture.load_routers(local_folder(system.routers) / MixtureFiles.ROUTERS)
        else:
            mixture.set_weights([system.weights[name] for name in mixture.names])
        return mixture.model, mixture.detach
    raise ValueError(f"unknown system kind {kind!r}")


def predict(model, tokenizer, examples: list[Example], kind: AnswerKind, *, batch_size: int,
            max_new_tokens: int, on_batch=None, prompt_format: str = "raw") -> list[str]:
    prompt_texts = [prompts.rendered_prompt(ex.question, kind, prompt_format, tokenizer) for ex in examples]
    outputs = generate_texts(model, tokenizer, prompt_texts, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, stop=END_MARK, on_batch=on_batch,
                             add_special_tokens=prompts.adds_special_tokens(prompt_format, True))
    return [texts[0] for texts in outputs]


def score_rows(examples: list[Example], outputs: list[str], kind: AnswerKind,
               likely: list[str | None] | None = None) -> list[dict]:
    """Each question's scores; ``likely``: the answer the likelihood reading gave (see
    :mod:`modecotd.likelihood`), None where the kind has no options or it was not read."""
    rows = []
    likely = likely or [None] * len(examples)
    for ex, text, option in zip(examples, outputs, likely):
        extracted = extract_answer(text, kind)
        reading = {} if option is None else {"likely_answer": option,
                                              "correct_likelihood": is_correct(option, ex.answer, kind)}
        rows.append({
            "question": ex.question,
            "gold": ex.answer,
            "output": text,
            "extracted": extracted,
            "correct": is_correct(extracted, ex.answer, kind),
            "correct_reference": reference_is_correct(text, ex.answer, kind),
            "format_ok": has_answer_format(text),
            "partial": partial_credit(extracted, ex.answer, kind),
            "source": ex.source,
            **reading,
        })
    return rows


def summarize(rows: list[dict], scoring: str = "strict") -> dict:
    """Accuracy under the chosen scoring plus the other scores, for one task and system."""
    n = len(rows)
    if n == 0:
        return {"n": 0, "accuracy": None}
    strict = sum(r["correct"] for r in rows) / n
    reference = sum(r["correct_reference"] for r in rows) / n
    partial = [r["partial"] for r in rows if r["partial"] is not None]
    read = [r["correct_likelihood"] for r in rows if "correct_likelihood" in r]
    return {
        "n": n,
        "accuracy": strict if scoring == "strict" else reference,
        "accuracy_strict": strict,
        "accuracy_reference": reference,
        "accuracy_likelihood": sum(read) / len(read) if read else None,
        "format_rate": sum(r["format_ok"] for r in rows) / n,
        "partial_credit": sum(partial) / len(partial) if partial else None,
    }


def majority_baseline(train_answers: list[str], test_answers: list[str]) -> dict:
    """Accuracy on the test answers of always giving the most common training answer.

    Ties go to the answer seen first; with no training answers there is no baseline.
    """
    if not train_answers or not test_answers:
        return {"answer": None, "accuracy": None}
    answer = collections.Counter(train_answers).most_common(1)[0][0]
    return {"answer": answer, "accuracy": sum(a == answer for a in test_answers) / len(test_answers)}
