"""A run, typed: where its files live (:class:`RunLayout`) and every unit of work each stage does,
fingerprinted in this one place (:class:`Plan`).

Fingerprints chain from stage to stage (an expert's key includes its rationales' key, a mixture's
its experts' keys, an evaluation its system's key), so a change anywhere redoes exactly what
depends on it, and a unit already on disk with the same key is skipped.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pydantic import BaseModel

from modecotd.artifacts import Unit, fingerprint
from modecotd.config import CONTROLS, MIXER_GRID, MIXER_METHODS, MIXTURE, mixture_system
from modecotd.errors import UserError
from modecotd.storage import Storage
from modecotd.tasks.schema import Example, Role, TaskData
from modecotd.units import JsonRecord

PIPELINE_VERSION = 1
# Settings of the training baselines only: adding a baseline must not retrain the experts.
BASELINE_KEYS = {"baselines", "full_finetune_task", "full_finetune_learning_rate"}
SHARDS = ".shards"
SEED_FOLDER = "seed-"  # seed-<s>/: the units of a seed other than the run's first (see RunConfig.seeds)
FEWSHOT_LORA = CONTROLS[2]  # the control trained in the distill stage
MIXTURES = (MIXTURE, *map(mixture_system, MIXER_METHODS))  # one, or one per method
# Every system of a run in the one order it is evaluated, reported and compared in: the paper's
# comparison first (base student, experts, mixtures, the multi-task LoRA), then the controls and
# full fine-tuning; each expert alone on a task without its own comes after them.
SYSTEMS = ("base", "expert", *MIXTURES, "multitask", *CONTROLS, "full_finetune")


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run, relative to its storage (see :mod:`modecotd.storage`)."""

    storage: Storage
    config: str = "config.yaml"
    tasks: str = "tasks.json"  # what the report needs of each task's data (modecotd.report.task_facts)
    timings: str = "timings.json"
    experts: str = "experts"
    mixtures: str = "mixtures"
    ray: str = "ray"  # Ray Train's and Tune's storage
    stamp: str = "run.json"  # which pipeline version wrote the run (see check_run_stamp)
    plan: str = "plan.json"  # every unit's wanted fingerprint, as the driver last planned (see Plan.wanted)
    replica: str = ""  # "" for the run's first seed; "seed-<s>/" holds another seed's trainings, mixtures, evaluations

    def for_seed(self, seed: int) -> "RunLayout":
        """The layout of another seed's units (the run's first seed keeps the plain paths)."""
        return dataclasses.replace(self, replica=f"{SEED_FOLDER}{seed}/")

    def unit(self, prefix: str, key: str) -> Unit:
        return Unit(self.storage, prefix, key)

    def rationales(self, task: str) -> str:
        return f"rationales/{task}"

    def rationale_shards(self, task: str) -> str:
        """The teacher's finished shards of a task, kept until its unit is committed."""
        return f"rationales/{SHARDS}/{task}"

    def expert(self, task: str) -> str:
        return f"{self.replica}{self.experts}/{task}"

    def baseline(self, name: str) -> str:
        return f"{self.replica}baselines/{name}"

    def mixture(self, task: str, system: str = MIXTURE) -> str:
        """A target task's mixture: ``mixtures/<task>``, or ``mixtures/<task>.<method>`` for the
        mixture system of one method (``mixture.systems: per_method``; task names hold no dot)."""
        label = task if system == MIXTURE else f"{task}.{system.removeprefix(MIXTURE + '-')}"
        return f"{self.replica}{self.mixtures}/{label}"

    def evaluation(self, task: str, system: str) -> str:
        return f"{self.replica}eval/{task}/{system}"


@dataclass(frozen=True)
class Training:
    """One training job of the distill stage: a seen task's expert, or a baseline (several tasks'
    rationales pooled, or every weight fine-tuned on one task)."""

    name: str
    unit: Unit
    sources: tuple[tuple[Unit, str], ...]  # (rationales unit, answer kind) per task it trains on
    baseline: bool = False
    full_finetune: bool = False
    target: str | None = None  # a control of one target task: trained on its few-shot rows, evaluated on it alone
    rows: tuple[dict, ...] = ()  # the rows it trains on when they are not a teacher's (a control's few-shot rows)
    kind: str | None = None  # their answer kind
    epochs: float | None = None  # its own epochs (default: the distill section's)
    seed: int = 0  # the seed it trains with (one of the run's seeds)

    @property
    def system(self) -> str:
        """The system it is evaluated as: its name, or the control's for a target's few-shot LoRA."""
        return FEWSHOT_LORA if self.target else self.name


@dataclass(frozen=True)
class Mixing:
    """One mixture of the mix stage: a target task's ``system``, chosen among ``settings``."""

    task: str
    system: str
    settings: tuple[dict, ...]
    unit: Unit

    @property
    def label(self) -> str:
        """Its folder's name under ``mixtures/`` (the task, or task.method)."""
        return self.unit.prefix.rsplit("/", 1)[1]


@dataclass(frozen=True)
class SystemSpec:
    """What an evaluator builds on the student (see :func:`modecotd.evaluate.load_system`): nothing
    (base), an expert's adapter, a fully fine-tuned model, or a mixture of experts' adapters at
    weights (a gate: with its routers). Each place is a committed unit (fetched to the evaluator's
    node) or a local folder."""

    kind: str  # base | expert | full | mixture
    adapter: "Unit | str | None" = None  # expert
    model: "Unit | str | None" = None  # full
    experts: dict = field(default_factory=dict)  # mixture: name -> its adapter
    weights: dict = field(default_factory=dict)  # mixture: name -> weight
    method: str = "lorahub"  # mixture: lorahub | delta | gate
    routers: "Unit | str | None" = None  # a gate mixture's unit


ALONE = "expert-"
"""The prefix of a system that is one seen task's expert evaluated on another task."""


@dataclass(frozen=True)
class System:
    """What is evaluated: the base student, or the student with what a unit built on it."""

    name: str  # base | expert | expert-<seen task> (on a task without its own) | mixture[-<method>] | multitask
    #            | full_finetune
    kind: str  # base | expert (a LoRA adapter) | full (fine-tuned weights) | mixture
    key: str
    built_by: Unit | None = None  # None: the base student
    experts: dict[str, Unit] = field(default_factory=dict)  # a mixture's experts

    def ready(self) -> bool:
        return self.built_by is None or self.built_by.done()

    def spec(self) -> SystemSpec:
        """What the evaluator builds: the units it reads, which it fetches on its own node; a
        mixture's weights come from its committed unit."""
        if self.kind == "base":
            return SystemSpec("base")
        if self.kind == "expert":
            return SystemSpec("expert", adapter=self.built_by)
        if self.kind == "full":
            return SystemSpec("full", model=self.built_by)
        summary = self.built_by.manifest()["summary"]
        return SystemSpec("mixture", method=summary["method"], weights=summary["weights"],
                          experts={name: self.experts[name] for name in summary["weights"]},
                          routers=self.built_by if summary["method"] == "gate" else None)


@dataclass(frozen=True)
class Evaluation:
    task: str
    system: System
    unit: Unit
    seed: int | None = None  # None: the run's first seed (or a system no seed changes, the base student)

    @property
    def label(self) -> str:
        """How logs and progress name it: task / system, with the seed when it is not the first."""
        return f"{self.task} / {self.system.name}" + ("" if self.seed is None else f" (seed {self.seed})")


@dataclass(frozen=True)
class PlannedUnit(JsonRecord):
    """One unit as the run's plan wants it (an entry of ``plan.json``)."""

    prefix: str  # its folder in the run's storage
    key: str  # the fingerprint wanted there
    stage: str  # teacher | distill | mix | evaluate
    task: str | None = None  # what it is of: the task (a baseline of several tasks: None)
    system: str | None = None  # what it builds or evaluates (see SYSTEMS)
    seed: int | None = None  # the seed it was made with (None: any seed's, as the base student's evaluation)


PLAN_FORMAT = 2  # plan.json: {"format": 2, "units": [PlannedUnit...]}; format 1 was {folder: fingerprint}


def plan_json(units: list[PlannedUnit]) -> str:
    return json.dumps({"format": PLAN_FORMAT, "units": [u.to_json() for u in units]}, indent=1) + "\n"


def fingerprinted_settings(section) -> dict:
    """A config section's settings that decide what it produces: every field but those the config
    marks as runtime settings (``json_schema_extra=RUNTIME``: resources, retries, endpoints' limits),
    and but a field added after runs existed while it has its default (``ADDED_LATER``), so that
    adding it leaves the units of earlier runs current."""
    dumped = section.model_dump(mode="json")

    def keep(model, values: dict) -> dict:
        kept = {}
        for name, spec in type(model).model_fields.items():
            rule = (spec.json_schema_extra or {}).get("fingerprint")
            value = getattr(model, name)
            if rule is False or (rule == "unless_default" and value == spec.default):
                continue
            kept[name] = keep(value, values[name]) if isinstance(value, BaseModel) else values[name]
        return kept

    return keep(section, dumped)


def examples_key(examples: list[Example]) -> str:
    return fingerprint([(e.question, e.answer, e.rationale) for e in examples])


def check_run_stamp(layout: RunLayout) -> None:
    """Refuse a run folder another pipeline version wrote: its units would not be understood (their
    fingerprints differ, so all of them would be redone over the old ones). A folder without a
    stamp was written before stamps existed, at version 1."""
    storage = layout.storage
    if not storage.exists(layout.stamp):
        return
    where = storage.describe(layout.stamp)
    try:
        stamp = json.loads(storage.read_text(layout.stamp))
        version = stamp["pipeline_version"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{where}: not a modecotd run stamp (no pipeline_version): is this folder a modecotd "
                        "run? Choose another --run-dir") from None
    if version != PIPELINE_VERSION:
        raise UserError(f"{where}: pipeline_version {version!r}, but this modecotd writes version "
                        f"{PIPELINE_VERSION}: the run was made by another modecotd release; use that release, "
                        "or choose another --run-dir (the old run is left as it is)")


def write_run_stamp(layout: RunLayout) -> None:
    layout.storage.write_text(layout.stamp, json.dumps({"pipeline_version": PIPELINE_VERSION}) + "\n")


class Plan:
    """Every unit of a run: rationales and an expert per seen task and the baselines asked for,
    known from the config alone; a mixture per target task of the experts trained so far; and each
    target evaluated on the base student and on every system built for it (its expert, its
    mixture, each baseline)."""

    def __init__(self, config, tasks: dict[str, TaskData], layout: RunLayout, seed: int | None = None):
        """The plan of the run's first seed (``config.replicate_seeds()``), or with ``seed`` and that
        seed's ``layout``, another seed's (see :meth:`replicas`)."""
        self.config, self.tasks, self.layout = config, tasks, layout
        self.seed = config.replicate_seeds()[0] if seed is None else seed
        self.first = not layout.replica
        self.common = {"version": PIPELINE_VERSION, "seed": self.seed}
        teacher = {"version": PIPELINE_VERSION, "seed": config.seed}  # one teacher stage for every seed
        self.rationales: dict[str, Unit] = {name: layout.unit(layout.rationales(name), fingerprint(
            teacher, fingerprinted_settings(config.teacher), tasks[name].train.key, tasks[name].kind.value,
            config.task(name).teacher_template,
            examples_key(tasks[name].fewshot) if config.teacher.prompting == "few_shot" else None))
            for name in (t.name for t in config.seen_tasks)}
        self.trainings: dict[str, Training] = self._trainings()  # experts by seen task, then baselines

    def replicas(self) -> list["Plan"]:
        """One plan per seed of the run: this one (its first seed, the plain paths), then each other
        seed's, whose trainings, mixtures and evaluations live under ``seed-<s>/`` (the teacher's
        rationales and the base student's evaluations are shared)."""
        return [self] + [Plan(self.config, self.tasks, self.layout.for_seed(seed), seed)
                         for seed in self.config.replicate_seeds()[1:]]

    @property
    def experts(self) -> dict[str, Training]:
        return {name: t for name, t in self.trainings.items() if not t.baseline}

    def trained_experts(self) -> dict[str, Unit]:
        return {name: t.unit for name, t in self.experts.items() if t.unit.done()}

    def mixtures(self) -> dict[str, Mixing]:
        """Each target task's mixtures (one, or one per method), of the experts trained so far (their
        keys are in its key), by :attr:`Mixing.label`."""
        experts_key = fingerprint(sorted((n, t.unit.key) for n, t in self.experts.items() if t.unit.done()))
        # the grid's values are in each mixture's settings; which controls run changes no other unit
        shared = {k: v for k, v in fingerprinted_settings(self.config.mixture).items()
                  if k not in (*MIXER_GRID, "systems", "controls", "fewshot_lora_epochs")}
        mixings = [Mixing(task.name, system, tuple(settings), self.layout.unit(
            self.layout.mixture(task.name, system), fingerprint(
                self.common, experts_key, shared, settings, examples_key(self.tasks[task.name].fewshot),
                self.config.distill.max_length)))
            for task in self.config.tasks for system, settings in self.config.mixture.choices().items()]
        return {m.label: m for m in mixings}

    def systems(self, task: str, mixtures: dict[str, Mixing]) -> list[System]:
        """What ``task`` is evaluated on, built or not yet."""
        systems = [System("base", "base", self.config.student.model)] if self.first else []  # no seed changes it
        if task in self.experts:
            systems.append(System("expert", "expert", self.experts[task].unit.key, self.experts[task].unit))
        elif self.config.evaluation.experts_alone:  # a task without its own: each seen task's expert alone
            systems += [System(f"{ALONE}{name}", "expert", t.unit.key, t.unit) for name, t in self.experts.items()]
        systems += [System(m.system, "mixture", m.unit.key, m.unit, {n: t.unit for n, t in self.experts.items()})
                    for m in mixtures.values() if m.task == task]
        systems += [System(t.system, "full" if t.full_finetune else "expert", t.unit.key, t.unit)
                    for t in self.trainings.values() if t.baseline and t.target in (None, task)]
        return systems

    def evaluations(self, built_only: bool = True) -> list[Evaluation]:
        """Each target task on every system that is built (or on every system), system by system in
        the order of :data:`SYSTEMS`, so that a run stopped part-way has whole systems to compare."""
        mixtures = self.mixtures()
        settings = (fingerprinted_settings(self.config.evaluation), fingerprinted_settings(self.config.student))
        evaluations = [Evaluation(task.name, system, self.layout.unit(self.layout.evaluation(task.name, system.name), fingerprint(
            self.common, system.key, examples_key(self.tasks[task.name].test), *settings)), None if self.first else self.seed)
            for task in self.config.tasks for system in self.systems(task.name, mixtures)
            if system.ready() or not built_only]
        return sorted(evaluations, key=lambda e: SYSTEMS.index(e.system.name) if e.system.name in SYSTEMS
                      else len(SYSTEMS))

    def planned_units(self) -> list["PlannedUnit"]:
        """Every unit of the run, built or not, of every seed, stage by stage: where it lives, the
        fingerprint this config wants there and what it is of. The driver keeps them in
        :attr:`RunLayout.plan`, so that what reads a run (report, compare, pull) takes the systems
        and units the run planned, and only units of the current plan: never one a redo failed to
        replace or one of a system the config no longer has (see :class:`modecotd.run_view.RunView`)."""
        units = []
        for plan in self.replicas():
            units += [PlannedUnit(unit.prefix, unit.key, "teacher", name) for name, unit in plan.rationales.items()]
            units += [PlannedUnit(t.unit.prefix, t.unit.key, "distill", t.target or (None if t.baseline else name),
                                  t.system if t.baseline else "expert", plan.seed) for name, t in plan.trainings.items()]
            units += [PlannedUnit(m.unit.prefix, m.unit.key, "mix", m.task, m.system, plan.seed)
                      for m in plan.mixtures().values()]
            units += [PlannedUnit(e.unit.prefix, e.unit.key, "evaluate", e.task, e.system.name,
                                  None if e.system.kind == "base" else plan.seed)
                      for e in plan.evaluations(built_only=False)]
        unique = {unit.prefix: unit for unit in units}  # the teacher's rationales are every seed's
        return list(unique.values())

    def wanted(self) -> dict[str, str]:
        """Every planned unit's folder and the fingerprint wanted there."""
        return {unit.prefix: unit.key for unit in self.planned_units()}

    def units(self, stage: str) -> list[Unit]:
        """The units a stage makes."""
        if stage == "teacher":
            return list(self.rationales.values())
        if stage == "distill":
            return [t.unit for t in self.trainings.values()]
        if stage == "mix":
            return [m.unit for m in self.mixtures().values()]
        return [e.unit for e in self.evaluations()]

    def _trainings(self) -> dict[str, Training]:
        config, rationales = self.config, self.rationales
        distill = {k: v for k, v in fingerprinted_settings(config.distill).items() if k not in BASELINE_KEYS}
        shared = (self.common, distill, fingerprinted_settings(config.student))

        def source(name: str) -> tuple[Unit, str]:
            return rationales[name], self.tasks[name].kind.value

        trainings = {name: Training(name, self.layout.unit(self.layout.expert(name), fingerprint(*shared, unit.key)),
                                    (source(name),), seed=self.seed) for name, unit in rationales.items()}
        if "multitask" in config.distill.baselines:
            key = fingerprint(*shared, "multitask", sorted((n, u.key) for n, u in rationales.items()))
            trainings["multitask"] = Training("multitask", self.layout.unit(self.layout.baseline("multitask"), key),
                                              tuple(source(n) for n in rationales), baseline=True, seed=self.seed)
        if "full_finetune" in config.distill.baselines:
            task = config.distill.full_finetune_task or next(iter(rationales))
            key = fingerprint(*shared, "full_finetune", rationales[task].key,
                              config.distill.full_finetune_learning_rate)
            trainings["full_finetune"] = Training("full_finetune", self.layout.unit(self.layout.baseline("full_finetune"), key),
                                                  (source(task),), baseline=True, full_finetune=True, seed=self.seed)
        if FEWSHOT_LORA in config.mixture.controls:
            epochs = config.mixture.fewshot_lora_epochs
            # an unseen target's few-shot rows trained on directly (a seen target has its own expert,
            # trained on many more rows of the same task)
            for task in (t for t in config.tasks if t.role == Role.UNSEEN):
                fewshot = self.tasks[task.name].fewshot
                name = f"{FEWSHOT_LORA}-{task.name}"
                key = fingerprint(*shared, FEWSHOT_LORA, examples_key(fewshot), self.tasks[task.name].kind.value, epochs)
                rows = tuple({"question": e.question, "answer": e.answer, "rationale": e.rationale} for e in fewshot)
                trainings[name] = Training(name, self.layout.unit(self.layout.baseline(name), key), (), baseline=True,
                                           target=task.name, rows=rows, kind=self.tasks[task.name].kind.value,
                                           epochs=epochs, seed=self.seed)
        return trainings
