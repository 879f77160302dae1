"""Config validation: every user mistake is one line naming file, line, key and what is allowed."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from modecotd.config_loading import apply_override, builtin_configs, check_data_paths, load_config
from modecotd.errors import ConfigError

GOOD = textwrap.dedent("""\
    name: demo
    tasks:
      - name: coins
        role: seen
        source: {kind: generated, family: coin_flip}
        sizes: {train: 10, fewshot: 3, test: 5}
    teacher:
      backend: scripted
    distill:
      epochs: 1
    """)


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_builtin_quickstart_is_valid():
    config = load_config("quickstart")
    assert config.name == "quickstart"
    assert {t.role.value for t in config.tasks} == {"seen", "unseen"}
    assert builtin_configs()["quickstart"].is_file()


def test_good_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.distill.epochs == 1
    assert config.distill.zero_stage == 2  # default
    assert config.mixture.bound == [3.0] and config.mixture.budget == [40]  # the paper's search
    assert config.mixture.method == ["lorahub"] and config.mixture.optimizer == "ngopt"
    assert config.distill.lora.target_modules is None  # the architecture's q and v projections


def test_mixture_settings_take_one_value_or_a_grid(tmp_path):
    mixture = "mixture:\n  method: [lorahub, gate]\n  l1: 0.1\n  top_k: [1, null]\n"
    config = load_config(write(tmp_path, GOOD + mixture))
    assert config.mixture.settings() == [
        {"method": "lorahub", "budget": 40, "bound": 3.0, "l1": 0.1, "top_k": 1},
        {"method": "lorahub", "budget": 40, "bound": 3.0, "l1": 0.1, "top_k": None},
        {"method": "gate", "budget": None, "bound": None, "l1": None, "top_k": None},  # one gate, whatever the grid
    ]


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("  epochs: 1", "  epochs: 1\n  epoch: 2"), ":11: distill.epoch: unknown key"),
    (GOOD.replace("epochs: 1", "epochs: many"), ":10: distill.epochs:"),
    (GOOD.replace("epochs: 1", "epochs: -1"), ":10: distill.epochs: Input should be greater than 0"),
    (GOOD.replace("backend: scripted", "backend: gpt9"), ":8: teacher.backend:"),
    (GOOD.replace("family: coin_flip", "family: chess"), ":5: tasks.0.source.family:"),
    (GOOD.replace("role: seen", "role: maybe"), ":4: tasks.0.role:"),
    (GOOD.replace("kind: generated", "kind: csv"), ":5: tasks.0.source:"),
    (GOOD.replace("name: coins", "name: Coins!"), ":3: tasks.0.name:"),
    (GOOD.replace("role: seen", "role: unseen"), "at least one task must have role 'seen'"),
])
def test_bad_configs_name_line_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "run.yaml" in message


def test_wrong_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="'scripted', 'precomputed', 'transformers', 'vllm' or 'openai'"):
        load_config(write(tmp_path, GOOD.replace("backend: scripted", "backend: gpt9")))


def test_duplicate_task_names(tmp_path):
    text = GOOD + textwrap.dedent("""\
        extra: 1
        """)
    with pytest.raises(ConfigError, match="extra: unknown key"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "name: x\n  bad: [1, 2\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))


def test_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    config = load_config(path, ["distill.epochs=2.5", "tasks.coins.sizes.test=7", "mixture.l1=[0.1, 0.2]",
                                "tasks.0.role=seen", "student.dtype=fp32"])
    assert config.distill.epochs == 2.5
    assert config.tasks[0].sizes.test == 7
    assert config.mixture.l1 == [0.1, 0.2]
    assert config.student.dtype == "fp32"


@pytest.mark.parametrize("override, message", [
    ("distill.epochs", "expected key.path=value"),
    ("tasks.chess.role=seen", "no item named 'chess'"),
    ("tasks.5.role=seen", "index out of range"),
    ("name.first=x", "is not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD), [override])


def test_override_values_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="distill.zero_stage"):
        load_config(write(tmp_path, GOOD), ["distill.zero_stage=4"])


def test_relative_data_paths_resolve_against_the_config(tmp_path):
    text = GOOD.replace("source: {kind: generated, family: coin_flip}",
                        "source: {kind: jsonl, train: data/train.jsonl, test: data/test.jsonl}\n    answer: yes_no")
    text = text.replace("backend: scripted", "backend: precomputed")
    config = load_config(write(tmp_path, text))
    assert config.tasks[0].source.train == (tmp_path / "data" / "train.jsonl").resolve()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"run.yaml:5: tasks.0.source.test: .*data/test.jsonl: file not found"):
        check_data_paths(config)
    (tmp_path / "data" / "test.jsonl").mkdir()
    with pytest.raises(ConfigError, match=r"run.yaml:5: tasks.0.source.test: .*data/test.jsonl: not a file"):
        check_data_paths(config)


def test_apply_override_creates_sections():
    data: dict = {}
    apply_override(data, "teacher.samples=3")
    assert data == {"teacher": {"samples": 3}}


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_validates(path):
    config = load_config(path)
    assert config.tasks and config.name


@pytest.mark.parametrize("teacher, message", [
    ({"backend": "openai"}, "needs an endpoint section"),
    ({"backend": "openai", "endpoint": {"url": "localhost:8000"}}, "teacher.endpoint.url: must start with http"),
    ({"backend": "precomputed", "rationalize": True}, "needs a generating backend"),
    ({"backend": "scripted", "prompting": "few_shot"}, "needs a generating backend"),
    ({"backend": "vllm"}, "set teacher.gpus_per_actor"),
    ({"backend": "vllm", "gpus_per_actor": 0.5}, "needs whole GPUs per actor: teacher.gpus_per_actor is 0.5"),
    ({"backend": "vllm", "gpus_per_actor": 2, "vllm": {"tensor_parallel_size": 4}},
     "teacher.vllm.tensor_parallel_size is 4 but teacher.gpus_per_actor is 2"),
    ({"backend": "vllm", "gpus_per_actor": 1, "vllm": {"gpu_memory_utilization": 1.5}},
     "teacher.vllm.gpu_memory_utilization: Input should be less than or equal to 1"),
    ({"backend": "vllm", "gpus_per_actor": 1, "vllm": {"max_model_len": 4}},
     "teacher.vllm.max_model_len: Input should be greater than or equal to 16"),
    ({"backend": "transformers", "vllm": {"max_model_len": 4096}}, "teacher.vllm is only used by backend 'vllm'"),
    ({"backend": "transformers", "endpoint": {"url": "http://x"}}, "only used by backend 'openai'"),
])
def test_teacher_settings_that_cannot_work_are_rejected(teacher, message):
    from modecotd.config_loading import parse_config

    data = {"name": "t", "tasks": [{"name": "a", "role": "seen",
                                    "source": {"kind": "generated", "family": "arithmetic"}}], "teacher": teacher}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_teacher_template_needs_exactly_the_question_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""\
        name: t
        tasks:
          - name: a
            role: seen
            source: {kind: generated, family: arithmetic}
            teacher_template: "Question: {q}"
        """))
    with pytest.raises(ConfigError, match=r"run.yaml:6: tasks.0.teacher_template: .*\{question\}"):
        load_config(path)


def _minimal(**sections) -> dict:
    return {"name": "t", "tasks": [{"name": "a", "role": "seen",
                                    "source": {"kind": "generated", "family": "arithmetic"}}], **sections}


def test_vllm_engine_settings_default_to_the_actors_gpus():
    from modecotd.config_loading import parse_config

    config = parse_config(_minimal(teacher={"backend": "vllm", "gpus_per_actor": 2}))
    assert config.teacher.vllm is None and config.teacher.tensor_parallel_size == 2
    config = parse_config(_minimal(teacher={"backend": "vllm", "gpus_per_actor": 4, "vllm": {
        "tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_model_len": 8192}}))
    assert config.teacher.tensor_parallel_size == 4
    assert (config.teacher.vllm.gpu_memory_utilization, config.teacher.vllm.max_model_len) == (0.8, 8192)


@pytest.mark.parametrize("gpus", [0.5, 0.25, 1.5, 2])
def test_a_training_worker_takes_exactly_one_gpu_with_use_gpu(gpus):
    """A share of a GPU fails in NCCL; more than one would sit idle (a worker computes on one)."""
    from modecotd.config_loading import parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(distill={"use_gpu": True, "gpus_per_worker": gpus}))
    message = str(info.value)
    assert f"distill.gpus_per_worker is {gpus:g}" in message and "exactly one whole GPU" in message
    assert "NCCL" in message and "idle" in message and "distill.workers_per_job" in message and "\n" not in message
    # Without use_gpu the value is not used, so it is not checked; one GPU passes.
    assert parse_config(_minimal(distill={"use_gpu": False, "gpus_per_worker": gpus})).distill.gpus_per_worker == gpus
    assert parse_config(_minimal(distill={"use_gpu": True, "gpus_per_worker": 1})).distill.gpus_per_worker == 1


@pytest.mark.parametrize(("section", "field", "instead"), [
    ("evaluation", "gpus_per_actor", "evaluation.actors"),
    ("mixture", "gpus_per_trial", "mixture.max_concurrent_trials"),
    ("teacher", "gpus_per_actor", "backend vllm"),
])
def test_more_than_one_gpu_for_single_device_work_is_refused(section, field, instead):
    """Evaluators, mixer trials and a transformers teacher compute on one device: a second reserved
    GPU would sit idle. A share of one (several actors on a GPU) and one are fine."""
    from modecotd.config_loading import parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(**{section: {field: 2}}))
    assert f"{section}.{field} is 2" in str(info.value) and instead in str(info.value)
    for fine in (0.5, 1):
        assert getattr(getattr(parse_config(_minimal(**{section: {field: fine}})), section), field) == fine


def test_a_vllm_teacher_commits_larger_shards_unless_told():
    from modecotd.config import VLLM_SHARD_SIZE
    from modecotd.config_loading import parse_config

    assert parse_config(_minimal()).teacher.shard_size == 64
    assert parse_config(_minimal(teacher={"backend": "vllm", "gpus_per_actor": 1})).teacher.shard_size == VLLM_SHARD_SIZE
    assert parse_config(_minimal(teacher={"backend": "vllm", "gpus_per_actor": 1, "shard_size": 32})
                        ).teacher.shard_size == 32


def test_gradient_checkpointing_is_off_by_default_and_can_be_set():
    from modecotd.config_loading import parse_config

    assert parse_config(_minimal()).distill.gradient_checkpointing is False
    assert parse_config(_minimal(distill={"gradient_checkpointing": True})).distill.gradient_checkpointing is True


def test_batch_sizes_default_to_auto_and_keep_explicit_numbers(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert (config.teacher.batch_size, config.evaluation.batch_size, config.mixture.candidates_per_forward) == \
        ("auto", "auto", "auto")
    config = load_config(write(tmp_path, GOOD), ["teacher.batch_size=4", "evaluation.batch_size=16",
                                                 "mixture.candidates_per_forward=2"])
    assert (config.teacher.batch_size, config.evaluation.batch_size, config.mixture.candidates_per_forward) == \
        (4, 16, 2)
    assert load_config(write(tmp_path, GOOD), ["evaluation.batch_size=auto"]).evaluation.batch_size == "auto"


@pytest.mark.parametrize("override", ["evaluation.batch_size=0", "evaluation.batch_size=big",
                                      "teacher.batch_size=2.5", "mixture.candidates_per_forward=true"])
def test_bad_batch_sizes_name_the_key_and_the_allowed_values(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"{key}: must be a whole number >= 1 or 'auto'")):
        load_config(write(tmp_path, GOOD), [override])


def test_auto_sizes_resolve_by_device():
    import torch

    from modecotd.config import EVALUATION_BATCH, MIXER_CANDIDATES, TEACHER_BATCH, AutoSize

    size = AutoSize(cpu=8, gpu=64)
    assert [size.resolve("auto", d) for d in ("cpu", "cuda", "cuda:1", torch.device("cpu"))] == [8, 64, 64, 8]
    assert size.resolve(5, "cuda") == 5 and size.resolve(5, "cpu") == 5  # a number is kept as it is
    for auto in (TEACHER_BATCH, EVALUATION_BATCH, MIXER_CANDIDATES):
        assert auto.resolve("auto", "cpu") == 8  # the CPU sizes of before: CPU runs are unchanged
        assert auto.resolve("auto", "cuda") > auto.resolve("auto", "cpu")


@pytest.mark.parametrize(("override", "message"), [
    (["mixture.cv_folds=1"], "cv_folds must be 0 (no cross-validation) or at least 2"),
    (["mixture.cv_folds=0", "mixture.l1=[0.01,0.05]"], "cv_folds 0 leaves no way to choose between the 2 settings"),
    (["mixture.cv_folds=0", "mixture.systems=per_method", "mixture.method=[lorahub,delta]", "mixture.l1=[0.01,0.05]"],
     "cv_folds 0 leaves no way to choose between the 2 settings of one method"),
])
def test_cross_validation_is_off_only_where_there_is_nothing_to_choose(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, GOOD), override)
    assert load_config(write(tmp_path, GOOD), ["mixture.cv_folds=0"]).mixture.cv_folds == 0
    each = load_config(write(tmp_path, GOOD), ["mixture.cv_folds=0", "mixture.systems=per_method",
                                               "mixture.method=[lorahub,delta,gate]"]).mixture
    assert {system: [s["method"] for s in settings] for system, settings in each.choices().items()} == {
        "mixture-lorahub": ["lorahub"], "mixture-delta": ["delta"], "mixture-gate": ["gate"],
        "uniform": ["uniform"], "best_expert": ["best_expert"]}  # the fixed-weight controls, each a system


def test_controls_default_to_all_and_may_be_left_out(tmp_path):
    assert load_config(write(tmp_path, GOOD)).mixture.controls == ["uniform", "best_expert", "fewshot_lora"]
    none = load_config(write(tmp_path, GOOD), ["mixture.controls=[]"]).mixture
    assert list(none.choices()) == ["mixture"]
    with pytest.raises(ConfigError, match="mixture.controls"):
        load_config(write(tmp_path, GOOD), ["mixture.controls=[uniform,median]"])
    with pytest.raises(ConfigError, match="each control may be named once"):
        load_config(write(tmp_path, GOOD), ["mixture.controls=[uniform,uniform]"])


def test_student_dtype_defaults_to_auto(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.student.dtype == config.teacher.dtype == "auto"
    with pytest.raises(ConfigError, match="student.dtype"):
        load_config(write(tmp_path, GOOD), ["student.dtype=fp16"])
