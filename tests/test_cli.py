"""Bad input gives one line on stderr, a non-zero exit, and no half-written artifact."""
from __future__ import annotations

import json

import yaml

from modecotd.cli import main


def config_text(extra_task: dict | None = None, student: str = "builtin:tiny", source: dict | None = None) -> str:
    config = {
        "name": "cli",
        "tasks": [{"name": "coins", "role": "seen", "source": source or {"kind": "generated", "family": "coin_flip"},
                   "sizes": {"train": 6, "fewshot": 3, "test": 3}}],
        "teacher": {"backend": "precomputed"},
        "student": {"model": student},
    }
    if extra_task:
        config["tasks"].append(extra_task)
    return yaml.safe_dump(config, sort_keys=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modecotd: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "missing.yaml", "not found")
    assert not (tmp_path / "run").exists()


def test_invalid_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config_text().replace("role: seen", "role: sometimes"))
    code, _, err = run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "c.yaml:4", "tasks.0.role")
    assert not (tmp_path / "run").exists()


def test_malformed_data_row_names_file_line_and_field(capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": "Is it?", "answer": "yes"}, {"question": "Is it not?"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = {"name": "custom", "role": "unseen", "answer": "yes_no",
            "source": {"kind": "jsonl", "test": str(data), "fewshot": str(data)}}
    path = tmp_path / "c.yaml"
    path.write_text(config_text(task))
    code, _, err = run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "qa.jsonl:2", "answer")
    assert not (tmp_path / "run").exists()


def test_unknown_model(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(student="no-such-org/no-such-model"))
    code, _, err = run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no-such-org/no-such-model")
    assert not (tmp_path / "run").exists()


def test_unknown_builtin_model(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(student="builtin:huge"))
    code, _, err = run_cli(capsys, "run", str(path), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "builtin:huge", "builtin:tiny")


def test_unknown_paper_task(capsys, tmp_path, paper_data):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(source={"kind": "paper", "data_dir": str(paper_data), "task": "chess"}))
    code, _, err = run_cli(capsys, "check", str(path))
    assert_one_line_error(code, err, "chess")


def test_check_lists_tasks(capsys):
    code, out, _ = run_cli(capsys, "check", "quickstart")
    assert code == 0
    assert "arithmetic_comparison: unseen, yes_no" in out
    assert "arithmetic: seen, number, train 64" in out and "coin_flip: seen, yes_no, train 64" in out


def test_bad_override(capsys):
    code, _, err = run_cli(capsys, "check", "quickstart", "--set", "distill.zero_stage=7")
    assert_one_line_error(code, err, "distill.zero_stage")


def test_every_argument_of_every_command_has_help_and_version_prints(capsys):
    import pytest

    import argparse
    from importlib.metadata import version

    from modecotd.cli import _parser, main

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.option_strings or action.dest}" for name, command in commands.choices.items()
               for action in command._actions if not action.help and not isinstance(action, argparse._HelpAction)]
    assert missing == []
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"modecotd {version('modecotd')}"
