"""The run configuration's schema: every section a typed pydantic model that rejects unknown keys,
with each key's type, default and description (docs/CONFIG.md is generated from it). Reading a
config file into it: :mod:`modecotd.config_loading`.
"""
from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr, field_validator, model_validator

from modecotd.errors import ConfigError
from modecotd.tasks.schema import AnswerKind, Role

TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"


@dataclass(frozen=True)
class AutoSize:
    """What ``auto`` means for a batch-like size: the small size that suits a CPU, or a larger one
    on a GPU. It is resolved where the work runs (the actor or trial that holds the model), never
    on the driver, which may have no GPU."""

    cpu: int
    gpu: int

    def resolve(self, value: "int | str", device: Any) -> int:
        """``value`` itself when it is a number; for ``auto`` the size for ``device`` (``"cpu"``,
        ``"cuda"``, ``"cuda:1"`` or a ``torch.device``)."""
        if value != "auto":
            return int(value)
        kind = str(getattr(device, "type", device)).split(":")[0]
        return self.gpu if kind == "cuda" else self.cpu

    def help(self, what: str) -> str:
        return f"{what}; auto: {self.gpu} on a GPU, {self.cpu} on a CPU, decided where the work runs"


def _int_or_auto(value: Any) -> "int | str":
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1 or 'auto', got {value!r}")
    return value


# A whole number >= 1 or "auto" (see AutoSize), with one clear message for anything else.
AutoInt = Annotated[Union[int, Literal["auto"]], PlainValidator(_int_or_auto)]
TEACHER_BATCH = AutoSize(cpu=8, gpu=64)
VLLM_SHARD_SIZE = 512  # teacher.shard_size's default for backend vllm
EVALUATION_BATCH = AutoSize(cpu=8, gpu=64)
# More candidates per round on a GPU: tpe, cmaes and random then ask in larger rounds (fewer
# updates of the sampler within the budget), for fewer, larger forwards.
MIXER_CANDIDATES = AutoSize(cpu=8, gpu=32)


# Marks a setting that changes where or how fast work runs, never what it produces: it stays out of
# every unit's fingerprint (modecotd.plan.fingerprinted_settings), so changing it redoes nothing.
RUNTIME = {"fingerprint": False}
ADDED_LATER = {"fingerprint": "unless_default"}  # in a unit's fingerprint only when set: earlier runs stay current


@dataclass
class ConfigOrigin:
    """Where a config's keys came from: the file, each key's line, and the ``--set`` overrides."""

    path: str = "<config>"
    key_lines: dict = None
    overrides: dict = None  # key path (tuple) -> the --set assignment

    def locate(self, loc: tuple) -> str:
        """``file:line: key.path``, or ``--set key=value: key.path`` for a key an override set."""
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        for key, assignment in (self.overrides or {}).items():
            if loc[:len(key)] == key:
                return f"--set {assignment}: {dotted}"
        line = None
        for end in range(len(loc), -1, -1):
            line = (self.key_lines or {}).get(loc[:end])
            if line is not None:
                break
        return f"{self.path}:{line}: {dotted}" if line else f"{self.path}: {dotted}"


class ConfigProblem(Exception):
    """A whole-config check's finding about one key (``loc``, a key path); pydantic lets it through
    unwrapped, so :func:`parse_config` can name that key's line instead of the top level."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


class Section(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def one_device(field: str, gpus: float, instead: str) -> None:
    """Refuse more than one GPU for work that computes on a single device (the rest would sit idle
    while reserved); a share of one GPU (0.5) is fine."""
    if gpus > 1:
        raise ValueError(f"{field} is {gpus:g}, but {instead}")


# --- tasks -------------------------------------------------------------------------------------


class GeneratedSource(Section):
    """A seeded procedural task (coin flip, last letters, shuffled objects, arithmetic)."""

    kind: Literal["generated"] = Field(description='generated: questions made by a seeded generator')
    family: Literal["coin_flip", "last_letter_concatenation", "tracking_shuffled_objects", "arithmetic",
                    "arithmetic_comparison"] = Field(description="the generator")
    size: int | None = Field(None, ge=1, description="people / words / swaps / steps per question")
    seed: int = Field(0, description="generator seed; splits never share a question")
    wording: Literal["original", "twin"] = Field(
        "original", description="twin: the family's skill told in other words (a lamp's switch for the coin flip, "
        "books between readers for the balls, other stories for the arithmetic, other phrasing for the letters): "
        "an unseen task whose matching expert is known, for checking that a mixer finds it")


class PaperSource(Section):
    """The paper's released `{input, output}` files: train/, learn/ (few-shot), evaluation/."""

    kind: Literal["paper"] = Field(description="paper: the paper's released {input, output} files")
    data_dir: Path = Field(description="folder holding train/, learn/ and evaluation/")
    task: str | None = Field(None, description="file stem in the data folder; default: the task's name")


class AnswerReading(Section):
    """How the gold is taken out of a question/answer row's answer field (jsonl and hf sources)."""

    answer_convention: Literal["plain", "gsm8k"] = Field(
        "plain", description="plain: the field is the answer; gsm8k: the answer follows the last ####, the text "
                             "before it (calculator notes removed) is the rationale")
    answer_regex: str | None = Field(None, description="a regular expression whose group 'answer' (else its "
                                                       "first group, else the match) is the gold")
    choices_field: str | None = Field(None, description="a field with the choices (a list of texts, or {label, "
                                                        "text} lists): they are written into the question with "
                                                        "letters, and the gold (a label, an index or a choice's "
                                                        "text) becomes its letter; needs answer: choice")

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return value


class JsonlSource(AnswerReading):
    """JSONL files with question / answer (and optional rationale) fields."""

    kind: Literal["jsonl"] = Field(description='jsonl: JSONL files of question/answer objects')
    train: Path | None = Field(None, description='the train split file (the teacher answers these questions)')
    fewshot: Path | None = Field(None, description='the few-shot split file (what a mixture is fitted on)')
    test: Path | None = Field(None, description='the test split file (what every system is evaluated on)')
    question_field: str = Field("question", description='the field with the question')
    answer_field: str = Field("answer", description='the field with the gold answer')
    rationale_field: str | None = Field(None, description="a field with a rationale (few-shot rows of an unseen "
                                                          "task need one)")


class HFSource(AnswerReading):
    """A Hugging Face dataset by name or a local `save_to_disk` folder. A row whose gold cannot be
    read is skipped and counted per split in the report, never guessed (a number task's gold must
    be a lone number: GSM8K's answer field needs ``answer_convention: gsm8k``)."""

    kind: Literal["hf"] = Field(description='hf: a Hugging Face dataset')
    dataset: str = Field(description="a hub id (owner/name) or a local save_to_disk folder")
    name: str | None = Field(None, description="the dataset's subset (config name), e.g. main for gsm8k")
    revision: str | None = Field(None, description="a branch, tag or commit of the hub dataset")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="data files of the hub dataset (datasets.load_dataset's data_files)")
    train_split: str | None = Field("train", description='the split the teacher answers; null: none')
    fewshot_split: str | None = Field(None, description="the split a mixture is fitted on; null: an unseen task "
                                                        "takes its first train rows")
    test_split: str | None = Field("test", description='the split every system is evaluated on; null: none')
    question_field: str = Field("question", description='the field with the question')
    answer_field: str = Field("answer", description='the field with the gold answer')
    rationale_field: str | None = Field(None, description="a field with a rationale; with answer_convention "
                                                          "gsm8k the answer field's solution is one")


TaskSource = Annotated[Union[GeneratedSource, PaperSource, JsonlSource, HFSource], Field(discriminator="kind")]


class SplitSizes(Section):
    """Rows per split: how many to generate, or N to keep from a file (null: all): the first N, or
    with ``sample_seed`` N drawn at random with that seed (the same rows on every run and machine)."""

    train: int | None = Field(None, ge=0, description='train rows kept (default: all; generated: 200)')
    fewshot: int | None = Field(None, ge=0, description="few-shot rows kept (default: all; generated: 5; an unseen "
                                                        "file task without a few-shot split: 5 of its train rows)")
    test: int | None = Field(None, ge=0, description='test rows kept (default: all; generated: 50)')
    sample_seed: int | None = Field(None, description="files only: draw each split's N rows at random with "
                                                      "this seed instead of taking the first N")


class TaskConfig(Section):
    """One task: where its data comes from and its role in the method."""

    name: str = Field(pattern=TASK_NAME_PATTERN, description="the task's name: letters, digits, - and _ (names its "
                                                             "folders and systems)")
    role: Role = Field(description="seen: the teacher answers its train questions and an expert is trained on "
                                   "them; unseen: no expert, only a mixture fitted on its few-shot rows")
    answer: AnswerKind | None = Field(None, description="answer kind; default from the family or paper task")
    source: TaskSource
    sizes: SplitSizes = SplitSizes()
    teacher_template: str | None = Field(
        None, description="how the teacher sees one question, with a {question} field; "
        "default 'Q: {question}\\nA:'")

    @field_validator("teacher_template")
    @classmethod
    def _one_question_field(cls, value: str | None) -> str | None:
        if value is None:
            return value
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        if fields != ["question"]:
            raise ValueError("must contain the field {question} exactly once and no other {field} "
                             "(write {{ and }} for literal braces)")
        return value

    @model_validator(mode="after")
    def _sampled_from_files_only(self):
        if self.sizes.sample_seed is not None and self.source.kind == "generated":
            raise ValueError("sizes.sample_seed draws rows from a file; a generated task is drawn with "
                             "source.seed")
        if getattr(self.source, "choices_field", None) and self.answer not in (None, AnswerKind.CHOICE):
            raise ValueError(f"source.choices_field needs answer: choice (the gold becomes the letter of its "
                             f"choice), not {self.answer.value}")
        return self


# --- stages ------------------------------------------------------------------------------------


class EndpointConfig(Section):
    """An OpenAI-compatible server (OpenAI, a vLLM server, ...) for teacher backend `openai`."""

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8000/v1; a redirect from it is refused, "
                     "never followed with the API key")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key (the key itself is never "
        "written to the config, logs or run folder); null: no key", json_schema_extra=RUNTIME)
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight per teacher actor",
                             json_schema_extra=RUNTIME)
    timeout_s: float = Field(120.0, gt=0, description="one request's whole time (connect, send, the full reply); "
                             "a reply still arriving then is cut off and retried", json_schema_extra=RUNTIME)
    max_retries: int = Field(5, ge=0, le=100, description="retries on 429, 5xx, timeouts and connection errors",
                             json_schema_extra=RUNTIME)
    backoff_s: float = Field(1.0, ge=0, description="first retry wait; doubles each retry", json_schema_extra=RUNTIME)

    @model_validator(mode="before")
    @classmethod
    def _api_is_the_prompt_format(cls, data):
        if isinstance(data, dict) and "api" in data:
            raise ValueError("api is gone: teacher.prompt_format decides (chat: messages to /chat/completions, the "
                             "same turns a local model's chat template gets; raw: the text to /completions)")
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError("must start with http:// or https://")
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.username or parts.password or parts.query:
            # it would be saved with the run's config and shown in logs: keys go in api_key_env's variable
            raise ValueError("must not hold credentials or a query string (user:password@, ?key=...); put the "
                             "key in the environment variable named by teacher.endpoint.api_key_env")
        return value.rstrip("/")


class VLLMSettings(Section):
    """The vLLM engine of teacher backend ``vllm`` (passed to ``vllm.LLM``)."""

    tensor_parallel_size: int | None = Field(
        None, ge=1, description="GPUs one engine shards the model over; must equal teacher.gpus_per_actor "
        "(default: that number)", json_schema_extra=RUNTIME)
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each GPU's memory the engine may take (weights and KV cache)",
        json_schema_extra=RUNTIME)
    max_model_len: int | None = Field(
        None, ge=16, description="context length the engine reserves KV cache for (prompt + new tokens); "
        "lower it when a long-context model's KV cache does not fit; default: the model's own")


GENERATING_BACKENDS = ("transformers", "vllm", "openai")
DTYPE_HELP = ("auto: bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or "
              "AMX), fp32 elsewhere, decided on the node that runs the work; bf16 on a CPU without it runs, "
              "with a warning, many times slower")
STAGES = ("teacher", "distill", "mix", "evaluate")  # the pipeline's stages, in order


class TeacherConfig(Section):
    """Stage 1: who writes the rationales, how, and how many per question."""

    backend: Literal["scripted", "precomputed", "transformers", "vllm", "openai"] = Field(
        "transformers",
        description="scripted: the generator's own step-by-step solution (generated tasks only); "
        "precomputed: rationales in the train files, re-scored; transformers: a local causal LM; "
        "vllm: a local causal LM on a GPU through vLLM; openai: an OpenAI-compatible endpoint",
    )
    model: str = Field("builtin:smollm2-135m-instruct",
                       description="local model (builtin:NAME, a folder or a cached hub id); "
                       "for backend openai, the model name the server knows")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description=DTYPE_HELP + " (bf16 generates ~1.4x faster on such a CPU, but its rounding makes "
        "greedy outputs depend on how prompts are batched; set fp32 where that matters)")
    prompting: Literal["zero_shot", "few_shot"] = Field(
        "zero_shot", description="zero_shot: 'Let's think step by step.' (Kojima et al.); few_shot: worked "
        "examples from the task's few-shot split before the question")
    fewshot_examples: int = Field(4, ge=1, le=64, description="worked examples shown in few_shot prompting")
    cot_trigger: str = Field("Let's think step by step.", description="the zero-shot chain-of-thought trigger after "
                                                                      "the question")
    prompt_format: Literal["raw", "chat"] = Field(
        "raw", json_schema_extra=ADDED_LATER,
        description="raw: each stage's prompt as text (a local model continues it; an endpoint gets it at "
        "/completions); chat: the same words as chat turns (the question and trigger as the user's turn, in stage 2 "
        "the rationale as the assistant's reply and the answer trigger as the next user turn), through the local "
        "model's chat template or an endpoint's /chat/completions")
    answer_trigger: str | None = Field(
        None, description="second-stage prompt that makes the teacher state its answer; default: Kojima et al.'s "
        "for the task's answer kind, e.g. 'Therefore, the answer (arabic numerals) is'")
    samples: int = Field(4, ge=1, le=64, description="rationales sampled per question")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="the teacher's sampling temperature")
    max_new_tokens: int = Field(128, ge=1, le=32768, description='longest rationale the teacher writes, in tokens')
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longer prompts are recorded as failed rows; default: the model's context "
        "length minus max_new_tokens")
    max_per_question: int | None = Field(None, ge=1, description="cap on accepted rationales per question")
    rationalize: bool = Field(
        False, description="for questions no sample got right, ask again with the gold answer as a hint "
        "(STaR); kept rows are marked rationalized")
    batch_size: AutoInt = Field("auto", description=TEACHER_BATCH.help("prompts per generate call (backend "
                                "transformers; vLLM batches by itself)"))
    shard_size: int = Field(64, ge=1, description=f"questions per committed shard (the unit of resume); backend "
                            f"vllm: {VLLM_SHARD_SIZE} unless set (a vLLM engine schedules its own batches and "
                            "drains between calls, so it wants many prompts per call)")
    endpoint: EndpointConfig | None = None
    vllm: VLLMSettings | None = Field(None, description="engine settings for backend vllm (default: "
                                      "tensor_parallel_size = gpus_per_actor, 0.9 of GPU memory, the model's context)")
    actors: int = Field(1, ge=1, description="teacher actors in the pool", json_schema_extra=RUNTIME)
    cpus_per_actor: float = Field(1.0, gt=0, json_schema_extra=RUNTIME)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per teacher actor (backend vllm needs >= 1)",
                                  json_schema_extra=RUNTIME)
    max_restarts: int = Field(3, ge=0, description="how many times a dead teacher actor is replaced",
                              json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _check_backend(self) -> "TeacherConfig":
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs an endpoint section (teacher.endpoint.url)")
        if self.backend != "openai" and self.endpoint is not None:
            raise ValueError(f"teacher.endpoint is only used by backend 'openai', not {self.backend!r}")
        if self.backend not in GENERATING_BACKENDS:
            for name, value, default in (("rationalize", self.rationalize, False),
                                         ("prompting", self.prompting, "zero_shot")):
                if value != default:
                    raise ValueError(f"teacher.{name}={value!r} needs a generating backend "
                                     f"({', '.join(GENERATING_BACKENDS)}), not {self.backend!r}")
        if self.backend == "vllm" and self.gpus_per_actor <= 0:
            raise ValueError("backend 'vllm' runs on GPUs: set teacher.gpus_per_actor (e.g. 1)")
        if self.backend != "vllm" and self.vllm is not None:
            raise ValueError(f"teacher.vllm is only used by backend 'vllm', not {self.backend!r}")
        if self.backend != "vllm":
            one_device("teacher.gpus_per_actor", self.gpus_per_actor, "a transformers teacher decodes on one GPU; "
                       "for more GPUs raise teacher.actors, or use backend vllm, which shards a model over them")
        if self.backend == "vllm":
            if "shard_size" not in self.model_fields_set:
                self.shard_size = VLLM_SHARD_SIZE
            if not float(self.gpus_per_actor).is_integer():
                raise ValueError(f"backend 'vllm' needs whole GPUs per actor: teacher.gpus_per_actor is "
                                 f"{self.gpus_per_actor:g} (each engine shards the model over "
                                 "teacher.vllm.tensor_parallel_size GPUs; use 1, 2, 4, ...)")
            tp = self.vllm.tensor_parallel_size if self.vllm else None
            if tp is not None and tp != int(self.gpus_per_actor):
                raise ValueError(f"teacher.vllm.tensor_parallel_size is {tp} but teacher.gpus_per_actor is "
                                 f"{self.gpus_per_actor:g}: each actor's engine uses exactly the GPUs Ray gives "
                                 "it, so set them equal")
        return self

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs one vLLM engine shards the model over: the configured size, else gpus_per_actor."""
        if self.vllm is not None and self.vllm.tensor_parallel_size is not None:
            return self.vllm.tensor_parallel_size
        return max(1, int(self.gpus_per_actor))

    @property
    def generates(self) -> bool:
        return self.backend in GENERATING_BACKENDS

    @property
    def loads_model(self) -> bool:
        """Whether each teacher actor loads ``model`` itself (an endpoint's model is the server's)."""
        return self.backend in ("transformers", "vllm")


class StudentConfig(Section):
    """The small model whose weights stay frozen."""

    model: str = Field("builtin:smollm2-135m-instruct", description="the student: builtin:NAME, a local model "
                       "folder (safetensors) or a cached hub id")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description=DTYPE_HELP + "; used by training, the mixer and evaluation")
    prompt_format: Literal["raw", "chat"] = Field(
        "raw", json_schema_extra=ADDED_LATER,
        description="raw: the paper's plain prompt ('<instruction>\\n\\nQ: <question>\\nA:'); chat: that prompt as the "
        "user's turn of the student tokenizer's chat template and the rationale as the assistant's reply (an "
        "instruct model); training, the mixer's few-shot loss and evaluation all use it")


class LoraSettings(Section):
    """The LoRA each expert trains (reference: r=16, alpha=32, dropout 0.1 on q and v)."""

    r: int = Field(16, ge=1, le=1024, description='LoRA rank of each expert')
    alpha: float = Field(32.0, gt=0, description='LoRA alpha (the update is scaled by alpha / r)')
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description='LoRA dropout while training')
    target_modules: list[str] | None = Field(
        None, min_length=1, description="module names the LoRA wraps; default: the architecture's attention "
        "query and value projections (q_proj, v_proj for Llama; q, v for T5)")


class DistillConfig(Section):
    """Stage 2: one LoRA expert per seen task, a Ray Train job each, DeepSpeed inside."""

    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="the experts' peak learning rate (AdamW, linear "
                                                                 "warm-up then decay)")
    epochs: float = Field(3.0, gt=0, description='passes over the rationales (a fraction stops part-way)')
    batch_size: int = Field(8, ge=1, description='rows per optimizer step, over all workers')
    max_length: int = Field(512, ge=8, description="longest training row in tokens (question, rationale and "
                                                   "answer); longer rows are left out and counted")
    max_rows_per_task: int | None = Field(None, ge=1, description="cap on accepted rationales used")
    use_rationalized: bool = Field(True, description="train on the teacher's rationalized rows too")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the steps spent warming the learning "
                                                                 "rate up")
    gradient_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size is "
                                       "split over workers and accumulation steps)")
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of the rationales held out for a "
                                       "validation loss; 0: none")
    eval_every: int = Field(0, ge=0, description="optimizer steps between validation losses; 0: once per epoch")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without a better loss (the best adapter is "
        "kept); needs validation_fraction > 0")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between Ray Train checkpoints; 0: none")
    max_failures: int = Field(2, ge=0, description="times Ray Train restarts a failed job from its last checkpoint",
                              json_schema_extra=RUNTIME)
    baselines: list[Literal["multitask", "full_finetune"]] = Field(
        default_factory=list, description="extra systems trained and evaluated beside the experts: multitask (one "
        "LoRA on all seen tasks pooled) and full_finetune (every student weight trained on one task)")
    full_finetune_task: str | None = Field(None, description="the task full_finetune trains on; default: the "
                                           "first seen task")
    full_finetune_learning_rate: float = Field(2e-5, gt=0, le=1.0, description="the full_finetune baseline's "
                                                                               "learning rate")
    zero_stage: Literal[1, 2, 3] = Field(2, description='DeepSpeed ZeRO stage of every training job')
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (DeepSpeed ZeRO-Offload)")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL between workers) instead of CPUs (gloo)",
                          json_schema_extra=RUNTIME)
    workers_per_job: int = Field(1, ge=1, json_schema_extra=RUNTIME)
    cpus_per_worker: float = Field(1.0, gt=0, json_schema_extra=RUNTIME)
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per training worker when use_gpu is on: a whole "
                                   "number (two workers cannot share a GPU in NCCL)", json_schema_extra=RUNTIME)
    max_concurrent_jobs: int = Field(2, ge=1, json_schema_extra=RUNTIME)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of keeping them (less memory "
        "for long rows or large students, ~30% more compute; the same losses)", json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> "DistillConfig":
        if self.early_stopping_patience is not None and self.validation_fraction <= 0:
            raise ValueError("early_stopping_patience needs validation_fraction > 0 (a held-out loss to watch)")
        return self

    @model_validator(mode="after")
    def _whole_gpus_per_worker(self) -> "DistillConfig":
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError(f"distill.gpus_per_worker is {self.gpus_per_worker:g}, but with use_gpu each training "
                             "worker uses exactly one whole GPU: workers sharing a GPU fail in NCCL, and a worker "
                             "computes on one device, so more would sit idle; for more GPUs raise "
                             "distill.workers_per_job")
        return self


MIXER_METHODS = ("lorahub", "delta", "gate")
MIXER_GRID = ("method", "budget", "bound", "l1", "top_k")  # each one value or a list: the Tune grid
MIXTURE = "mixture"  # the system of a target task's mixture (mixture.systems best)
# What else a target's few-shot rows buy, each a system of its own: the experts' plain average (their
# updates summed with weight 1/n), the one expert with the lowest few-shot loss, a LoRA trained on the
# few-shot rows alone. The first two are fixed-weight mixtures of the mix stage, the last a training.
CONTROLS = ("uniform", "best_expert", "fewshot_lora")
WEIGHT_CONTROLS = ("uniform", "best_expert")


def mixture_system(method: str) -> str:
    """The system of one method's mixture (mixture.systems per_method): mixture-<method>."""
    return f"{MIXTURE}-{method}"


class MixtureConfig(Section):
    """Stage 3: a mixture of the experts for each target task, its weights searched on the task's
    few-shot examples. ``method``, ``budget``, ``bound``, ``l1`` and ``top_k`` take one value or a
    list: Ray Tune runs every combination per target task and keeps the one with the best
    cross-validated few-shot loss."""

    @model_validator(mode="before")
    @classmethod
    def _mlflow_moved(cls, data):
        if isinstance(data, dict) and "mlflow_tracking_uri" in data:
            raise ValueError("mlflow_tracking_uri moved to tracking.mlflow, which every stage logs to")
        return data

    method: list[Literal[MIXER_METHODS]] = Field(
        default_factory=lambda: ["lorahub"], min_length=1, description="lorahub (the paper's: A and B summed "
        "with the weights separately), delta (the exact weighted sum of the experts' updates) or gate (per-token "
        "weights from a router per layer, trained on few-shot rows; budget, bound, l1 and top_k do not apply)")
    systems: Literal["best", "per_method"] = Field(
        "best", description="best: one mixture per target task, the setting with the lowest CV loss over every "
        "method (system 'mixture'); per_method: one per method, each its own best setting, evaluated side by side "
        "(systems 'mixture-lorahub', 'mixture-delta', 'mixture-gate')")
    optimizer: Literal["ngopt", "tpe", "cmaes", "random", "gradient"] = Field(
        "ngopt", description="weight search: Nevergrad NGOpt (the paper's), Optuna TPE or CMA-ES, random, or "
        "gradient (Adam on the weights with the exact gradient)")
    budget: list[int] = Field(default_factory=lambda: [40], min_length=1,
                              description="objective evaluations per weight search")
    bound: list[float] = Field(default_factory=lambda: [3.0], min_length=1,
                               description="weights searched in [-bound, bound]")
    l1: list[float] = Field(default_factory=lambda: [0.05], min_length=1,
                            description="coefficient of the L1 penalty on the weights (times mean |w|)")
    objective: Literal["token_mean", "per_row"] = Field(
        "token_mean", description="the few-shot loss the weights minimise, before the L1 term: token_mean (the "
        "mean cross-entropy over every target token of the few-shot rows) or per_row (that mean divided by the "
        "number of rows, as the authors' code computes it: with 5 rows their L1 weighs 5 times more for the "
        "same l1)")
    top_k: list[int | None] = Field(default_factory=lambda: [None], min_length=1, description="mix only the k "
                                    "experts with the lowest few-shot loss on their own; null: all")
    start: float = Field(0.0, description="every weight's starting value (the paper's: 0, the student as it is)")
    orders: int = Field(
        3, ge=1, le=100, description="weight searches per fit, each over the experts in its own seeded random order, "
        "each with the whole budget; the one with the lowest few-shot objective is kept and the report shows how "
        "the weights spread over the orders. 1: a single search in the config's task order, the authors' exact "
        "setting, whose result depends on that order (NGOpt's first step moves only the first expert's weight); "
        "the gate does not search weights")
    candidates_per_forward: AutoInt = Field("auto", description=MIXER_CANDIDATES.help(
        "weight candidates asked for and evaluated together in batched forwards (tpe, cmaes, random; ngopt is "
        "sequential); more per round means fewer sampler updates within the budget"))
    learning_rate: float = Field(0.2, gt=0, description="step size of the gradient optimizer")
    gate_steps: int = Field(50, ge=1, description="full-batch AdamW steps that train the gate's routers")
    gate_learning_rate: float = Field(1e-2, gt=0, description="step size of the gate mixer's router training")
    gate_rows: Literal["task", "pooled"] = Field(
        "task", description="what the gate trains on: the target task's few-shot rows, or those pooled with "
        "every other task's few-shot rows")
    controls: list[Literal[CONTROLS]] = Field(
        default_factory=lambda: list(CONTROLS), description="systems that use a target task's few-shot rows without "
        "a search, evaluated beside the mixtures: uniform (the experts' updates averaged, weight 1/n each), "
        "best_expert (the one expert with the lowest few-shot loss), fewshot_lora (a LoRA trained on an unseen "
        "target's few-shot rows alone, with the distill stage's LoRA settings; a seen target has its expert)")
    fewshot_lora_epochs: float = Field(10.0, gt=0, description="epochs of the fewshot_lora control over its few rows")
    cv_folds: int = Field(2, ge=0, description="folds over the few-shot examples that score each setting; 0: no "
                          "cross-validation (only with a single setting, where there is nothing to choose)")
    scheduler: Literal["none", "asha", "median"] = Field(
        "asha", description="stop settings whose first folds score poorly, per target task: ASHA or median "
        "stopping; none runs every setting to the end")
    cpus_per_trial: float = Field(1.0, gt=0, json_schema_extra=RUNTIME)
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per Tune trial (the student runs on one when > 0)",
                                  json_schema_extra=RUNTIME)
    max_concurrent_trials: int = Field(2, ge=1, json_schema_extra=RUNTIME)

    @field_validator("gpus_per_trial")
    @classmethod
    def _one_gpu_per_trial(cls, value: float) -> float:
        one_device("mixture.gpus_per_trial", value, "a trial fits mixtures on one GPU; for more GPUs raise "
                   "mixture.max_concurrent_trials")
        return value

    @field_validator(*MIXER_GRID, mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _ranges(self) -> "MixtureConfig":
        if any(v < 0 for v in self.l1):
            raise ValueError("every L1 coefficient must be >= 0")
        if any(v < 1 for v in self.budget):
            raise ValueError("every budget must be >= 1")
        if any(v <= 0 for v in self.bound):
            raise ValueError("every bound must be > 0")
        if any(k is not None and k < 1 for k in self.top_k):
            raise ValueError("every top_k must be >= 1 (or null for all experts)")
        if any(abs(self.start) > b for b in self.bound):
            raise ValueError(f"start {self.start} lies outside a bound")
        if self.cv_folds == 1:
            raise ValueError("cv_folds must be 0 (no cross-validation) or at least 2")
        crowded = max(len(settings) for settings in self.choices().values())
        if len(set(self.controls)) != len(self.controls):
            raise ValueError("each control may be named once")
        if self.cv_folds == 0 and crowded > 1:
            within = " of one method" if self.systems == "per_method" else ""
            raise ValueError(f"cv_folds 0 leaves no way to choose between the {crowded} settings{within} of the "
                             "grid: set cv_folds >= 2 or give one value per key")
        return self

    def choices(self) -> dict[str, list[dict]]:
        """Each mixture system a target task gets, with the settings its mixture is chosen from:
        {'mixture': every setting} or {'mixture-<method>': that method's settings}, then each
        fixed-weight control with its one setting."""
        if self.systems == "best":
            chosen = {MIXTURE: self.settings()}
        else:
            chosen = {mixture_system(method): [s for s in self.settings() if s["method"] == method]
                      for method in self.method}
        for control in (c for c in WEIGHT_CONTROLS if c in self.controls):
            chosen[control] = [{"method": control, "budget": None, "bound": None, "l1": None, "top_k": None}]
        return chosen

    def settings(self) -> list[dict]:
        """The mixer settings Ray Tune tries for every target task: every combination of the
        lists for weighted methods, one setting for the gate."""
        out = []
        for method in self.method:
            if method == "gate":
                out.append({"method": "gate", "budget": None, "bound": None, "l1": None, "top_k": None})
                continue
            out.extend({"method": method, "budget": budget, "bound": bound, "l1": l1, "top_k": top_k}
                       for budget, bound, l1, top_k in itertools.product(self.budget, self.bound, self.l1, self.top_k))
        return out


class EvaluationConfig(Section):
    """Stage 4: batched greedy decoding and scoring."""

    scoring: Literal["strict", "reference"] = Field("strict", description="the reading the report leads with: "
                                                                          "strict (the answer after the student's "
                                                                          "--> marker) or reference (the paper's "
                                                                          "own extraction)")
    likelihood: bool = Field(True, description="also read every yes/no and multiple-choice answer by likelihood: "
                             "the option the system finds most probable after its own reasoning and the answer "
                             "marker (a reading that does not need the answer format), beside strict and reference")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="longest answer a system writes when evaluated, in "
                                                                "tokens")
    experts_alone: bool = Field(True, json_schema_extra=RUNTIME, description="also evaluate every seen task's "
                                "expert alone on each task that has no expert of its own (systems expert-<task>); "
                                "which pairs are evaluated, not what one produces, so no fingerprint input")
    batch_size: AutoInt = Field("auto", description=EVALUATION_BATCH.help("test questions decoded together"))
    actors: int = Field(1, ge=1, json_schema_extra=RUNTIME)
    cpus_per_actor: float = Field(1.0, gt=0, json_schema_extra=RUNTIME)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per evaluator actor (decoding runs on one when > 0)",
                                  json_schema_extra=RUNTIME)

    @field_validator("gpus_per_actor")
    @classmethod
    def _one_gpu_per_actor(cls, value: float) -> float:
        one_device("evaluation.gpus_per_actor", value, "an evaluator decodes on one GPU; for more GPUs raise "
                   "evaluation.actors")
        return value


class WandbSettings(Section):
    """A Weights & Biases project the run logs to."""

    project: str = Field(min_length=1, description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user (default: the login's)")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: written under dir only, to `wandb sync` later (no network, no login)")
    dir: str | None = Field(None, description="where W&B keeps its files (default: beside the model cache)")


class TrackingConfig(Section):
    """Experiment trackers every stage logs to: the distill stage each expert's loss and speed per
    step (and the adapter), the mix stage each Tune trial, the evaluation the accuracy of every
    system on every task and the report's files. Not part of any unit's fingerprint."""

    mlflow: str | None = Field(None, description="an MLflow tracking URI (file:///path/mlruns, sqlite:///mlflow.db, "
                               "http://host:5000); needs pip install 'modecotd[mlflow]'")
    wandb: WandbSettings | None = Field(None, description="a W&B project; needs pip install 'modecotd[wandb]'")
    tensorboard: bool = Field(True, description="TensorBoard event files: each expert's under the run's "
                              "tensorboard/ (a run folder on this machine), each Tune trial's under ray/mix-*/")


class ResourcesConfig(Section):
    """What a local Ray cluster started by `modecotd run` may use (num_cpus, dashboard: ignored with
    --address), and how long a stage waits for an autoscaled cluster to hold what it asks for."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster a run starts (default: every "
                                                         "CPU of this machine)")
    dashboard: bool = Field(True, description='start the Ray dashboard with a local cluster')
    dashboard_host: str = Field("127.0.0.1", json_schema_extra=RUNTIME,
                                description="the interface the local cluster's dashboard listens on (0.0.0.0: all)")
    placement_timeout_s: float = Field(600, ge=0, json_schema_extra=RUNTIME,
                                       description="how long a stage whose actors or jobs do not fit the cluster "
                                                   "waits for nodes to join (autoscaling) before it fails; a "
                                                   "cluster the run started itself is never waited for")
    stall_timeout_s: float = Field(300, gt=0, json_schema_extra=RUNTIME,
                                   description="how long an actor or training worker holding work may go without "
                                               "answering (stopped, frozen, cut off by the network) before it is "
                                               "killed and its work given to another")


class RunConfig(Section):
    """The whole run: tasks and the four stages."""

    name: str = Field(pattern=TASK_NAME_PATTERN, description="the run's name: its folder is <storage>/<name>")
    seed: int = Field(0, description="the teacher's and the data's seed, and the training seed when seeds is not given")
    seeds: list[int] | None = Field(
        None, min_length=1, description="training and mixing seeds: the distill and mix stages run once per seed "
        "into this run (the teacher once), each seed's systems are evaluated, and the report gives each seed's "
        "results, their mean and intervals that include the spread over seeds; the first seed's units have the "
        "run's plain paths, the others' are under seed-<s>/. Default: [seed]")
    storage: str = Field("runs", min_length=1, json_schema_extra=RUNTIME,
                         description="where runs live, the run in <storage>/<name>: a local folder (one machine), "
                                     "a folder every node mounts (NFS, a ReadWriteMany volume) or s3://bucket/prefix, "
                                     "gs://...; credentials from the environment only")
    tasks: list[TaskConfig] = Field(min_length=1)
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    mixture: MixtureConfig = MixtureConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = Field(TrackingConfig(), json_schema_extra=RUNTIME)
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _check_tasks(self) -> "RunConfig":
        names = [t.name for t in self.tasks]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ConfigProblem(("tasks", index, "name"), f"task names must be unique; {name!r} is task "
                                                             f"{names.index(name)} too")
        if not any(t.role == Role.SEEN for t in self.tasks):
            raise ConfigProblem(("tasks",), "at least one task must have role 'seen' (it gets an expert)")
        ft = self.distill.full_finetune_task
        if ft is not None and ft not in [t.name for t in self.seen_tasks]:
            raise ConfigProblem(("distill", "full_finetune_task"), f"{ft!r} is not a seen task")
        if self.teacher.backend == "scripted":
            for index, task in enumerate(self.tasks):
                if task.role == Role.SEEN and task.source.kind != "generated":
                    raise ConfigProblem(("tasks", index, "source", "kind"),
                                        f"teacher backend 'scripted' needs generated tasks; {task.name} is "
                                        f"{task.source.kind!r}")
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each seed may be given once")
        return value

    def replicate_seeds(self) -> list[int]:
        """The seeds the distill and mix stages run with, the first one's units at the plain paths."""
        return list(self.seeds) if self.seeds else [self.seed]

    _origin: ConfigOrigin | None = PrivateAttr(None)  # where the config came from, for error messages

    def where(self, *loc) -> str:
        """``file:line: key.path`` (or ``--set key=value``) for error messages about a key."""
        return (self._origin or ConfigOrigin()).locate(loc)

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        from modecotd.storage import checked_uri

        try:
            checked_uri(value)  # refuses credentials in it
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return value

    def run_location(self) -> str:
        """Where this run's artifacts live: <storage>/<name>."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def seen_tasks(self) -> list[TaskConfig]:
        return [t for t in self.tasks if t.role == Role.SEEN]
