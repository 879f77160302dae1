"""What each stage produces, declared once: every kind of unit, the files it holds and the summary
its manifest records, typed.

| stage | unit kind | folder (:class:`~modecotd.plan.RunLayout`) | files | summary |
|---|---|---|---|---|
| teacher | a task's rationales | ``rationales/<task>`` | :class:`RationaleFiles` | :class:`RationalesSummary` |
| distill | an expert, a baseline | ``experts/<task>``, ``baselines/<name>`` | :class:`TrainingFiles` | :class:`TrainingSummary` |
| mix | a target task's mixture | ``mixtures/<task>[.<method>]`` | :class:`MixtureFiles` | :class:`MixtureSummary` |
| evaluate | a system on a task | ``eval/<task>/<system>`` | :class:`EvaluationFiles` | :class:`EvaluationSummary` |
| (report) | the run's report | the run's root | :class:`ReportFiles` | report.json |

Another seed's trainings, mixtures and evaluations live under ``seed-<s>/``. What each unit is made
from (its fingerprinted inputs) is :class:`~modecotd.plan.Plan`'s; how a unit is committed and
verified, :mod:`modecotd.artifacts`'. A stage returns ``Done(summary)`` per unit
(:mod:`modecotd.outcome`). Readers of runs made by earlier releases read the manifests' summaries
as they were written (a field added since is missing there), so the report takes them as dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


class RationaleFiles:
    """rationales/<task>/: every sample the teacher returned, by what became of it."""

    ACCEPTED = "accepted.jsonl"  # a right final answer: the distill stage's rows
    REJECTED = "rejected.jsonl"  # every other sample, with its reason
    FAILED = "failed.jsonl"  # a question the teacher could not do, with the reason
    BY_STATUS = {"accepted": ACCEPTED, "rejected": REJECTED, "failed": FAILED}


class TrainingFiles:
    """experts/<task>/ and baselines/<name>/: the peft adapter (a full fine-tune: the model's own
    files) and the training's summary with its loss curves."""

    SUMMARY = "training.json"  # TrainingSummary, with the losses
    ADAPTER_CONFIG = "adapter_config.json"  # peft's names
    ADAPTER_WEIGHTS = "adapter_model.safetensors"
    ADAPTER = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


class MixtureFiles:
    """mixtures/<task>[.<method>]/: the kept setting's mixture (weights and merged adapter, or a
    gate's router) with its summary, and every trial's search."""

    SUMMARY = "mixture.json"  # MixtureSummary, with the optimizer and the experts' folders
    SEARCH = "search.json"  # {"trials": [SettingRecord...]} (modecotd.mixture_fit)
    ROUTERS = "routers.safetensors"  # a gate mixture's routers
    ADAPTER = "adapter"  # a weighted mixture merged into one peft adapter


class EvaluationFiles:
    """eval/<task>/<system>/: each test question's output and readings (the summary is in the
    manifest)."""

    ROWS = "predictions.jsonl"


class ReportFiles:
    """The report, at the run's root, rebuilt from the units alone (modecotd.report)."""

    MARKDOWN = "report.md"  # written last: it says the report is there
    JSON = "report.json"
    HTML = "report.html"
    ACCURACY_PLOT = "accuracy.png"
    TRAINING_PLOT = "training.png"
    WEIGHTS_PLOT = "mixture_weights.png"
    SEARCH_PLOT = "search.png"
    ALL = (MARKDOWN, JSON, HTML, ACCURACY_PLOT, TRAINING_PLOT, WEIGHTS_PLOT, SEARCH_PLOT)


class JsonRecord:
    """A dataclass that is written as JSON and read back: :meth:`to_json` and :meth:`from_json` (a
    field missing from the JSON takes its default)."""

    JSON_NAMES: ClassVar[dict[str, str]] = {}  # a field whose JSON key is a Python keyword
    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()  # left out of the JSON while None

    def to_json(self) -> dict[str, Any]:
        return {self.JSON_NAMES.get(k, k): v for k, v in dataclasses.asdict(self).items()
                if not (k in self.OMITTED_WHEN_NONE and v is None)}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        return cls(**{f.name: data[cls.JSON_NAMES.get(f.name, f.name)] for f in dataclasses.fields(cls)
                      if cls.JSON_NAMES.get(f.name, f.name) in data})


class Summary(JsonRecord):
    """A unit's summary as its manifest records it."""


@dataclass(frozen=True)
class RationalesSummary(Summary):
    """A task's rationales: what the teacher was asked and what it returned."""

    backend: str
    model: str | None  # None: a backend that generates nothing (scripted, precomputed)
    questions: int
    accepted: int  # samples with a right final answer
    rejected: int
    failed: int  # questions the teacher could not do
    questions_with_rationale: int
    yield_: float  # questions_with_rationale / questions
    rationales_per_answered_question: float
    mean_rationale_words: float
    rationalized: int  # rationales written to a given answer (rationalization)
    rejection_reasons: dict[str, int]
    failure_reasons: dict[str, int]
    samples_asked: int
    samples_returned: int
    generated_tokens: int
    tokens_per_second: float | None

    JSON_NAMES: ClassVar[dict[str, str]] = {"yield_": "yield"}


@dataclass(frozen=True)
class TrainingSummary(Summary):
    """An expert's or a baseline's training: sizes, the loss curves, the stop, the precision, the
    speed (``training.json``; the manifest's leaves out the losses)."""

    steps: int
    planned_steps: int
    rows: int
    rows_too_long: int
    examples: int
    validation_examples: int
    target_tokens_rank0: int
    validation_losses: list
    stopped_early: bool
    best_validation_loss: float | None
    first_loss: float
    final_loss: float  # the mean of the last steps' losses
    zero_stage: int  # the DeepSpeed ZeRO stage the engine ran
    world_size: int
    gradient_accumulation: int
    resumed_from_step: int | None
    precision: dict
    started_at: float
    finished_at: float
    target_tokens_per_s_rank0: float
    losses: list[float] | None = None  # every micro-step's (training.json only)
    status: str = "done"

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("losses",)

    def without_losses(self) -> "TrainingSummary":
        """What the unit's manifest records."""
        return dataclasses.replace(self, losses=None)


@dataclass(frozen=True)
class MixtureSummary(Summary):
    """A target task's mixture: the setting kept (by CV loss), its weights and scores, every
    setting's CV loss, and how much the kept weights depend on the experts' order."""

    method: str
    budget: int | None
    bound: float | None
    l1: float | None
    top_k: int | None
    setting: str
    cv_loss: float | None
    objective: float
    weights: dict[str, float]
    experts_mixed: list[str]
    zero_weights_loss: float
    precision: dict | None
    candidates: list[dict]  # {"setting", "cv_loss"} of every setting scored to the end
    system: str
    settings_tried: int  # those missing from the candidates were stopped early
    status: str = "done"
    orders: list[dict] | None = None  # see modecotd.mixture_fit.order_summary
    weight_range: dict[str, list[float]] | None = None
    largest_by_order: list[str] | None = None
    kept_order: int | None = None
    order_agreement: float | None = None
    control: str | None = None  # uniform | best_expert: a fixed-weight control

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = (
        "orders", "weight_range", "largest_by_order", "kept_order", "order_agreement", "control")


@dataclass(frozen=True)
class EvaluationSummary(Summary):
    """A system on a task's test questions: the reading the run leads with (``accuracy``) and every
    other reading (see :func:`modecotd.evaluate.summarize`)."""

    n: int
    accuracy: float | None
    accuracy_strict: float | None = None
    accuracy_reference: float | None = None
    accuracy_likelihood: float | None = None  # choice and yes/no tasks only
    format_rate: float | None = None
    partial_credit: float | None = None
    precision: dict | None = None
