"""Bad input, table-driven: every case is refused with exit code 2 and one line on stderr that names
the file (with the line where there is one) and the key or field, and leaves nothing half-written.

Each case builds a small project in a temporary folder (a config, its data files, sometimes a run
folder), runs the CLI in this process and checks that line. No case needs a running Ray cluster:
input is checked before Ray starts or anything is written. The cases are examples of rules (every
key validated, every path checked, every row read), not the rules themselves.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable

import pytest
import yaml

from modecotd.cli import main

def parity_rows(numbers: range, rationale: bool = False) -> list[dict]:
    rows = [{"question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in numbers]
    if rationale:
        for i, row in zip(numbers, rows):
            row["rationale"] = f"{i} ends in an {'even' if i % 2 == 0 else 'odd'} digit."
    return rows


QA = parity_rows(range(6))
WORKED = parity_rows(range(10, 16), rationale=True)


@dataclass
class Project:
    """A config and its data files in ``root``; ``config`` is changed before :meth:`write`."""

    root: Path
    config: dict = field(default_factory=dict)
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # run after the case

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.jsonl("fewshot.jsonl", WORKED)
        self.jsonl("test.jsonl", QA)
        self.jsonl("train.jsonl", parity_rows(range(20, 40), rationale=True))
        self.config = {
            "name": "bad-input",
            "tasks": [
                {"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip"},
                 "sizes": {"train": 6, "fewshot": 3, "test": 3}},
                {"name": "parity", "role": "unseen", "answer": "yes_no",
                 "source": {"kind": "jsonl", "test": "test.jsonl", "fewshot": "fewshot.jsonl",
                            "rationale_field": "rationale"}},
            ],
            "teacher": {"backend": "scripted"},
            "student": {"model": "builtin:tiny"},
        }

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_path(self) -> Path:
        return self.root / "c.yaml"

    def jsonl(self, name: str, rows: list, raw: bytes | None = None) -> Path:
        path = self.root / name
        path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
        return path

    def write(self, text: str | bytes | None = None) -> str:
        if text is None:
            text = yaml.safe_dump(self.config, sort_keys=False)
        if isinstance(text, str):
            text = text.encode()
        self.config_path.write_bytes(text)
        return str(self.config_path)

    def line_of(self, needle: str) -> int:
        """The 1-based line of the config that contains ``needle``."""
        for number, line in enumerate(self.config_path.read_text().splitlines(), 1):
            if needle in line:
                return number
        raise AssertionError(f"{needle!r} not in the config")

    def run(self, *extra: str) -> list[str]:
        return ["run", self.write(), "--run-dir", str(self.run_dir), *extra]

    def task(self, name: str) -> dict:
        return next(t for t in self.config["tasks"] if t["name"] == name)


# A case: given a fresh Project, set it up and return (argv, fragments the error line must hold).
Case = Callable[[Project], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str):
    def register(function: Case) -> Case:
        CASES[name] = function
        return function
    return register


# --------------------------------------------------------------------------- the config file


@case("config: file missing")
def _(p):
    return ["run", str(p.root / "nope.yaml")], ["nope.yaml", "not found"]


@case("config: a folder, not a file")
def _(p):
    (p.root / "dir.yaml").mkdir()
    return ["check", str(p.root / "dir.yaml")], ["dir.yaml", "not found"]


@case("config: empty file")
def _(p):
    return ["run", p.write("")], ["c.yaml", "empty"]


@case("config: invalid YAML (unclosed bracket)")
def _(p):
    return ["run", p.write("name: x\ntasks: [\n  {name: a\n")], ["c.yaml:", "invalid YAML"]


@case("config: invalid YAML (bad indentation)")
def _(p):
    return ["run", p.write("name: x\nteacher:\n  backend: scripted\n samples: 2\n")], ["c.yaml:4", "invalid YAML"]


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML whose nested aliases expand to 9**levels values."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@case("config: YAML aliases that expand to billions of values")
def _(p):
    text = alias_bomb(10)
    assert len(text) < 600
    return ["check", p.write(text)], ["c.yaml:6", "YAML aliases expand the document to", "at most 100,000"]


@case("config: a YAML alias inside its own value")
def _(p):
    return ["check", p.write("name: x\ntasks: &t [1, *t]\n")], ["c.yaml:2", "refers to the value that holds it"]


@case("config: not a mapping")
def _(p):
    return ["run", p.write("- name\n- tasks\n")], ["c.yaml", "mapping"]


@case("config: not UTF-8")
def _(p):
    return ["run", p.write(b"name: caf\xe9\n")], ["c.yaml:1", "UTF-8"]


@case("config: unknown top-level key")
def _(p):
    p.config["tecaher"] = {"backend": "scripted"}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('tecaher')}", "tecaher", "unknown key"]


@case("config: unknown nested key")
def _(p):
    p.config["distill"] = {"epocs": 2}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('epocs')}", "distill.epocs", "unknown key"]


@case("config: wrong type")
def _(p):
    p.config["distill"] = {"epochs": "many"}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('epochs')}", "distill.epochs"]


@case("config: out of range (int)")
def _(p):
    p.config["distill"] = {"lora": {"r": 0}}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('r: 0')}", "distill.lora.r"]


@case("config: out of range (float)")
def _(p):
    p.config["distill"] = {"lora": {"dropout": 1.5}}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('dropout')}", "distill.lora.dropout"]


@case("config: unknown choice")
def _(p):
    p.config["teacher"]["backend"] = "gpt-9"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('gpt-9')}", "teacher.backend", "gpt-9"]


@case("config: conflicting values (early stopping without validation)")
def _(p):
    p.config["distill"] = {"early_stopping_patience": 2, "validation_fraction": 0}
    argv = p.run()
    return argv, ["c.yaml:", "distill", "early_stopping_patience"]


@case("config: conflicting values (scripted teacher on a file task)")
def _(p):
    p.task("parity")["role"] = "seen"
    p.task("parity")["source"]["train"] = "train.jsonl"
    return p.run(), ["c.yaml", "scripted", "parity"]


@case("config: duplicate task names")
def _(p):
    p.config["tasks"].append(dict(p.task("coins")))
    argv = p.run()
    return argv, ["c.yaml:", "tasks", "coins", "unique"]


@case("config: no seen task")
def _(p):
    p.task("coins")["role"] = "unseen"
    return p.run(), ["c.yaml:", "seen"]


@case("config: bad task name")
def _(p):
    p.task("coins")["name"] = "coin flips!"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('coin flips!')}", "tasks.0.name"]


@case("config: unknown generated family")
def _(p):
    p.task("coins")["source"]["family"] = "chess"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('chess')}", "tasks.0.source.family", "chess"]


@case("config: unknown source kind")
def _(p):
    p.task("coins")["source"]["kind"] = "csv"
    argv = p.run()
    return argv, ["c.yaml:", "tasks.0.source", "csv"]


@case("config: a hub answer_regex that is not a regular expression")
def _(p):
    p.task("coins")["source"] = {"kind": "hf", "dataset": str(p.root / "ds"), "answer_regex": "(#### [0-9"}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('answer_regex')}", "tasks.0.source.answer_regex", "not a regular expression"]


@case("config: a hub choices_field on a task whose answer is not a choice")
def _(p):
    p.task("coins")["source"] = {"kind": "hf", "dataset": str(p.root / "ds"), "choices_field": "choices"}
    p.task("coins")["answer"] = "yes_no"
    p.config["teacher"] = {"backend": "precomputed"}
    argv = p.run()
    return argv, ["c.yaml:", "tasks.0", "source.choices_field needs answer: choice"]


@case("config: unknown model")
def _(p):
    p.config["student"]["model"] = "no-such-org/no-such-model"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('no-such-model')}", "student.model", "no-such-org/no-such-model"]


@case("config: unknown built-in model")
def _(p):
    p.config["student"]["model"] = "builtin:huge"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('builtin:huge')}", "student.model", "builtin:tiny"]


@case("config: unknown paper task")
def _(p):
    (p.root / "paper" / "train").mkdir(parents=True)
    p.task("parity")["source"] = {"kind": "paper", "data_dir": "paper", "task": "chess"}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('name: parity')}", "tasks.1", "chess"]


@case("config: missing data file")
def _(p):
    p.task("parity")["source"]["test"] = "missing.jsonl"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('missing.jsonl')}", "tasks.1.source.test", "missing.jsonl", "not found"]


@case("config: data path is a folder")
def _(p):
    (p.root / "folder.jsonl").mkdir()
    p.task("parity")["source"]["fewshot"] = "folder.jsonl"
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('folder.jsonl')}", "tasks.1.source.fewshot", "folder.jsonl"]


@case("config: missing paper data folder")
def _(p):
    p.task("parity")["source"] = {"kind": "paper", "data_dir": "no-such-folder", "task": "coin_flip"}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('no-such-folder')}", "tasks.1.source.data_dir", "no-such-folder"]


@case("config: an unseen task with no few-shot rows")
def _(p):
    del p.task("parity")["source"]["fewshot"]
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('name: parity')}", "tasks.1", "few-shot"]


@case("config: few-shot rows without the rationale field")
def _(p):
    p.jsonl("fewshot.jsonl", parity_rows(range(10, 16)))
    return p.run(), ["fewshot.jsonl", "rationale"]


@case("config: openai backend without endpoint")
def _(p):
    p.config["teacher"] = {"backend": "openai", "model": "m"}
    argv = p.run()
    return argv, ["c.yaml:", "teacher", "endpoint"]


@case("config: endpoint URL not http")
def _(p):
    p.task("coins")["source"] = {"kind": "jsonl", "train": "train.jsonl", "test": "test.jsonl",
                                 "fewshot": "fewshot.jsonl", "rationale_field": "rationale"}
    p.config["teacher"] = {"backend": "openai", "model": "m", "endpoint": {"url": "ftp://example.org/v1"}}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('ftp://')}", "teacher.endpoint.url"]


@case("config: credentials in the storage URI")
def _(p):
    p.config["storage"] = "s3://AKIAEXAMPLE:hunter2secret@bucket/runs"
    argv = ["run", p.write()]
    return argv, [f"c.yaml:{p.line_of('storage')}", "storage"]


@case("config: credentials in the endpoint URL")
def _(p):
    p.task("coins")["source"] = {"kind": "jsonl", "train": "train.jsonl", "test": "test.jsonl",
                                 "fewshot": "fewshot.jsonl", "rationale_field": "rationale"}
    p.config["teacher"] = {"backend": "openai", "model": "m",
                           "endpoint": {"url": "https://user:hunter2secret@example.org/v1?key=hunter2secret"}}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('https://')}", "teacher.endpoint.url", "api_key_env"]


@case("config: teacher template without {question}")
def _(p):
    p.task("parity")["teacher_template"] = "Q: {prompt}\nA:"
    argv = p.run()
    return argv, ["c.yaml:", "tasks.1.teacher_template", "{question}"]


@case("config: a mixture search range that is empty")
def _(p):
    p.config["mixture"] = {"top_k": [0]}
    argv = p.run()
    return argv, [f"c.yaml:{p.line_of('mixture:')}", "mixture", "top_k"]


@case("--set: a key that does not exist")
def _(p):
    return p.run("--set", "distill.nope=1"), ["distill.nope", "unknown key"]


@case("--set: no '='")
def _(p):
    return p.run("--set", "distill.epochs"), ["--set", "distill.epochs", "key.path=value"]


@case("--set: into a value that is not a section")
def _(p):
    return p.run("--set", "name.first=1"), ["--set", "name.first", "not a section"]


@case("--set: a value of the wrong type")
def _(p):
    return p.run("--set", "distill.batch_size=lots"), ["distill.batch_size"]


@case("--set: a task that does not exist")
def _(p):
    return p.run("--set", "tasks.chess.role=seen"), ["--set", "tasks.chess", "no item named"]


# --------------------------------------------------------------------------- data files


def _bad_test_rows(p: Project, raw: bytes) -> list[str]:
    p.jsonl("test.jsonl", [], raw=raw)
    return p.run()


@case("data: malformed JSONL line")
def _(p):
    return _bad_test_rows(p, b'{"question": "Is 1 even?", "answer": "no"}\n{"question": "Is 2 even?", "ans\n'), \
        ["test.jsonl:2", "invalid JSON"]


@case("data: a row that is not an object")
def _(p):
    return _bad_test_rows(p, b'["Is 1 even?", "no"]\n'), ["test.jsonl:1", "not a JSON object"]


@case("data: missing field")
def _(p):
    return _bad_test_rows(p, b'{"question": "Is 1 even?", "answer": "no"}\n{"question": "Is 2 even?"}\n'), \
        ["test.jsonl:2", "answer"]


@case("data: null field")
def _(p):
    return _bad_test_rows(p, b'{"question": null, "answer": "no"}\n'), ["test.jsonl:1", "question"]


@case("data: empty question")
def _(p):
    return _bad_test_rows(p, b'{"question": "   ", "answer": "no"}\n'), ["test.jsonl:1", "question"]


@case("data: empty file")
def _(p):
    return _bad_test_rows(p, b""), ["test.jsonl", "no rows"]


@case("data: only blank lines")
def _(p):
    return _bad_test_rows(p, b"\n\n  \n"), ["test.jsonl", "no rows"]


@case("data: not UTF-8")
def _(p):
    return _bad_test_rows(p, b'{"question": "Is 1 even?", "answer": "no"}\n'
                             b'{"question": "Is 2 even?", "answer": "yes"}\n'
                             b'{"question": "Caf\xe9?", "answer": "no"}\n'), ["test.jsonl:3", "UTF-8"]


@case("data: a gold answer of the wrong kind")
def _(p):
    return _bad_test_rows(p, b'{"question": "Is 1 even?", "answer": "banana"}\n'), ["test.jsonl:1", "answer", "banana"]


@case("data: duplicate ids")
def _(p):
    rows = [{"id": "q1", **QA[0]}, {"id": "q2", **QA[1]}, {"id": "q1", **QA[2]}]
    return _bad_test_rows(p, "".join(json.dumps(r) + "\n" for r in rows).encode()), ["test.jsonl:3", "id", "q1"]


@case("data: a huge line")
def _(p):
    row = {"question": "Is 1 even? " + "x" * 3_000_000, "answer": "no"}
    return _bad_test_rows(p, (json.dumps(QA[0]) + "\n" + json.dumps(row) + "\n").encode()), ["test.jsonl:2", "MB"]


@case("data: a question longer than the student's context")
def _(p):
    row = {"question": "Is 1 even? " + "seven " * 3000, "answer": "no"}
    return _bad_test_rows(p, (json.dumps(QA[0]) + "\n" + json.dumps(row) + "\n").encode()), \
        ["test.jsonl:2", "question", "tokens", "context"]


@case("data: malformed JSON array file")
def _(p):
    p.jsonl("test.json", [], raw=b'[\n {"question": "Is 1 even?", "answer": "no"},\n {"question": \n')
    p.task("parity")["source"]["test"] = "test.json"
    return p.run(), ["test.json:", "invalid JSON"]


@case("data: a JSON file that is not an array")
def _(p):
    p.jsonl("test.json", [], raw=b'{"question": "Is 1 even?", "answer": "no"}\n')
    p.task("parity")["source"]["test"] = "test.json"
    return p.run(), ["test.json", "array"]


@case("data: a field name the rows do not have")
def _(p):
    p.task("parity")["source"]["question_field"] = "prompt"
    return p.run(), ["fewshot.jsonl:1", "'prompt'", "missing"]


# --------------------------------------------------------------------------- artifacts and cluster


@case("artifacts: a later stage alone with no expert in the run folder")
def _(p):
    return p.run("--stage", "mix"), [str(p.run_dir), "rationales/coins", "teacher stage"]


@case("artifacts: an expert's adapter changed after it was committed")
def _(p):
    from modecotd.config_loading import load_config
    from modecotd.jobs.driver import load_tasks
    from modecotd.plan import Plan, RunLayout
    from modecotd.storage import Storage

    config = load_config(p.write())
    plan = Plan(config, load_tasks(config), RunLayout(Storage(p.run_dir)))
    with plan.rationales["coins"].writing() as staging:  # the teacher stage's unit, as committed
        (staging / "accepted.jsonl").write_text("{}\n")
    expert = plan.experts["coins"].unit
    with expert.writing() as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (p.run_dir / expert.prefix / "adapter_model.safetensors").write_bytes(b"\1" * 64)  # same size, other bytes
    return p.run("--stage", "mix"), [str(p.run_dir), "experts/coins", "distill stage", "changed after it was written"]


@case("artifacts: a run folder written by another pipeline version")
def _(p):
    p.run_dir.mkdir()
    (p.run_dir / "run.json").write_text(json.dumps({"pipeline_version": 999}))
    return p.run(), [str(p.run_dir / "run.json"), "pipeline_version 999"]


@case("artifacts: a run folder whose stamp is not one")
def _(p):
    p.run_dir.mkdir()
    (p.run_dir / "run.json").write_text("{not json")
    return p.run(), [str(p.run_dir / "run.json"), "pipeline_version"]


@case("cluster: nothing listens at --address")
def _(p):
    port = _free_port()
    return p.run("--address", f"127.0.0.1:{port}"), [f"127.0.0.1:{port}", "cannot reach"]


@case("cluster: --address is a web server, not Ray")
def _(p):
    address = _web_server(p)
    return p.run("--address", address), [address, "not a Ray cluster"]


@case("cluster: --address without a port")
def _(p):
    return p.run("--address", "localhost"), ["--address localhost", "HOST:PORT"]


@case("submit: the files to upload are over the limit")
def _(p):
    with open(p.root / "train.jsonl", "ab") as handle:  # incompressible: zipped it stays over 100 MiB
        handle.write(os.urandom(101 * 2**20))
    (p.root / "weights.bin").write_bytes(os.urandom(2**20))  # beside the config, not needed: never sent
    p.task("coins")["source"] = {"kind": "jsonl", "train": "train.jsonl", "test": "test.jsonl",
                                 "fewshot": "fewshot.jsonl", "rationale_field": "rationale"}
    p.config["teacher"] = {"backend": "precomputed"}
    return ["submit", p.write(), "--address", f"http://127.0.0.1:{_free_port()}"], \
        ["train.jsonl", "MB zipped, over the", "--working-dir"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _web_server(p: Project) -> str:
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p.cleanup.append(server.shutdown)
    return f"127.0.0.1:{server.server_address[1]}"


# --------------------------------------------------------------------------- the test


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*")}


def test_an_alias_bomb_is_refused_within_a_second(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(12))  # 9**12 values once expanded
    started = time.monotonic()
    assert main(["check", str(path)]) == 2
    assert time.monotonic() - started < 1.0
    assert "YAML aliases expand the document to" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = Project(tmp_path / "project")
    argv, fragments = CASES[name](project)
    before = _snapshot(project.run_dir)
    started = time.monotonic()
    try:
        code = main(argv)
    finally:
        for stop in project.cleanup:
            stop()
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " WARNING " not in line]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("modecotd: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    assert "hunter2secret" not in err
    assert _snapshot(project.run_dir) == before, "the run folder changed"
    assert elapsed < 30, f"took {elapsed:.0f} s"
