"""Prompt and target formats shared by every stage.

One prompt format per answer kind for every split of a task (train, few-shot, test), which is
what the released data lacks for coin_flip and strategy_qa (see shared/data/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from modecotd.tasks.answers import ANSWER_MARK, END_MARK
from modecotd.tasks.schema import AnswerKind

INSTRUCTIONS = {
    AnswerKind.NUMBER: "Infer the correct answer for the question.",
    AnswerKind.CHOICE: "Infer the correct choice for the question.",
    AnswerKind.YES_NO: "Infer True(yes) or False(no) for the question.",
    AnswerKind.TEXT: "Infer the correct answer for the question.",
}

DEFAULT_TEACHER_TEMPLATE = "Q: {question}\nA:"
COT_TRIGGER = "Let's think step by step."
# Kojima et al.'s answer-extraction prompts, one per answer kind.
ANSWER_TRIGGERS = {
    AnswerKind.NUMBER: "Therefore, the answer (arabic numerals) is",
    AnswerKind.CHOICE: "Therefore, among A through F, the answer is",
    AnswerKind.YES_NO: "Therefore, the answer (Yes or No) is",
    AnswerKind.TEXT: "Therefore, the answer is",
}
HINT = "(Hint: the answer is {answer}.)"


def student_prompt(question: str, kind: AnswerKind) -> str:
    """The student's input, as in the paper's released data."""
    return f"{INSTRUCTIONS[kind]}\n\nQ: {question}\nA:"


def student_target(rationale: str, answer: str) -> str:
    """What the student learns to write after its prompt: rationale, marker, answer, END."""
    return f" {rationale.strip()}\n\n{ANSWER_MARK}\n\n{answer} {END_MARK}"


def rendered_prompt(question: str, kind: AnswerKind, prompt_format: str = "raw", tokenizer=None) -> str:
    """The student's prompt as its tokenizer sees it: ``raw``, the paper's text (:func:`student_prompt`);
    ``chat``, that text as the user's turn of the tokenizer's chat template, ending where the
    assistant's reply begins. Tokenise a chat prompt without adding special tokens (the template
    wrote them): see :func:`adds_special_tokens`."""
    text = student_prompt(question, kind)
    if prompt_format == "raw":
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def rendered_target(rationale: str, answer: str, prompt_format: str = "raw") -> str:
    """The reply the student learns after :func:`rendered_prompt` (then its tokenizer's EOS, which for
    an instruct model's tokenizer is the token that ends the assistant's turn)."""
    target = student_target(rationale, answer)
    return target if prompt_format == "raw" else target.lstrip()


def adds_special_tokens(prompt_format: str, default: bool) -> bool:
    """Whether to let the tokenizer add its special tokens (a BOS) to a rendered prompt: as the
    caller does for raw text (``default``), never for a chat prompt, which holds them already."""
    return default and prompt_format == "raw"


def check_chat_template(tokenizer, where: str) -> None:
    """A chat prompt format needs a tokenizer with a chat template; ``where`` names the config key."""
    if getattr(tokenizer, "chat_template", None) is None:
        from modecotd.errors import ConfigError

        raise ConfigError(f"{where}: chat needs a tokenizer with a chat template (an instruct or chat model's); "
                          "this model's has none: use raw")


@dataclass(frozen=True)
class TeacherPrompts:
    """How one task's questions are put to the teacher: two-stage chain of thought.

    Stage 1 asks for reasoning: the question in the task's template, after worked examples
    (few-shot CoT) or followed by the CoT trigger (zero-shot CoT, Kojima et al. 2022). Stage 2
    appends the reasoning and the answer trigger, and the teacher states its answer. A hint (the
    gold answer) is added to the question for rationalization (STaR).
    """

    kind: AnswerKind
    template: str = DEFAULT_TEACHER_TEMPLATE
    cot_trigger: str = COT_TRIGGER
    answer_trigger: str | None = None  # default: the kind's trigger
    demos: tuple[tuple[str, str, str], ...] = ()  # (question, rationale, answer) worked examples
    chat: bool = False  # teacher.prompt_format chat: each stage's text as chat turns (see reasoning, answer)

    @property
    def trigger(self) -> str:
        return self.answer_trigger or ANSWER_TRIGGERS[self.kind]

    def reasoning_text(self, question: str, hint: str | None = None) -> str:
        if hint is not None:
            question = f"{question}\n{HINT.format(answer=hint)}"
        shots = "".join(
            f"{self.template.format(question=q)} {r.strip()} {self.trigger} {a}.\n\n" for q, r, a in self.demos)
        asked = self.template.format(question=question)
        return shots + asked if self.demos else f"{asked} {self.cot_trigger}"

    def reasoning(self, question: str, hint: str | None = None) -> str | list[dict]:
        """Stage 1's prompt: the text, or (chat) that text as the user's turn."""
        text = self.reasoning_text(question, hint)
        return [{"role": "user", "content": text}] if self.chat else text

    def answer(self, question: str, rationale: str, hint: str | None = None) -> str | list[dict]:
        """Stage 2's prompt: stage 1's text continued with the rationale and the answer trigger, or
        (chat) stage 1's turn, the rationale as the assistant's reply and the trigger as the next
        user turn: the same words, laid out as the backend's chat template or chat API expects."""
        if self.chat:
            return [{"role": "user", "content": self.reasoning_text(question, hint)},
                    {"role": "assistant", "content": rationale.strip()},
                    {"role": "user", "content": self.trigger}]
        return f"{self.reasoning_text(question, hint)} {rationale.strip()}\n{self.trigger}"

    @property
    def reasoning_stop(self) -> list[str]:
        """Where stage 1 ends: at an answer trigger, or where the model starts a new question."""
        stops = [self.trigger, "Therefore, the answer"]
        lead = self.template.split("{question}")[0].strip()
        if lead:
            stops.append("\n" + lead)
        return list(dict.fromkeys(stops))
