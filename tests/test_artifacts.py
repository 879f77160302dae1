"""Fingerprints and atomic units: a reader never sees half an artifact; re-runs skip done work."""
from __future__ import annotations

import json

import pytest

from modecotd.artifacts import MANIFEST, Unit, clean_staging, fingerprint


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"lr": 5e-4, "epochs": 3}, ["x", "y"])
    assert a == fingerprint({"epochs": 3, "lr": 5e-4}, ["x", "y"])  # key order does not matter
    assert a != fingerprint({"lr": 5e-4, "epochs": 4}, ["x", "y"])
    assert a != fingerprint({"lr": 5e-4, "epochs": 3}, ["y", "x"])
    assert len(a) == 16


def test_unit_commit_then_done(tmp_path):
    unit = Unit(tmp_path / "experts" / "gsm8k", "abc")
    assert not unit.done()
    summary = {}
    with unit.writing(summary) as staging:
        (staging / "adapter.bin").write_text("weights")
        summary["loss"] = 0.5
        assert not unit.path.exists()  # nothing visible before the commit
    assert unit.done()
    manifest = json.loads((unit.path / MANIFEST).read_text())
    assert manifest["summary"] == {"loss": 0.5} and manifest["fingerprint"] == "abc"
    assert (unit.path / "adapter.bin").read_text() == "weights"
    assert not Unit(unit.path, "other-key").done()  # other settings: not done


def test_crash_while_writing_leaves_nothing(tmp_path):
    unit = Unit(tmp_path / "u", "k")
    with pytest.raises(RuntimeError):
        with unit.writing() as staging:
            (staging / "half.jsonl").write_text("{")
            raise RuntimeError("killed")
    assert not unit.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_recommit_replaces_the_old_unit(tmp_path):
    old = Unit(tmp_path / "u", "v1")
    with old.writing() as staging:
        (staging / "old.txt").write_text("1")
    new = Unit(tmp_path / "u", "v2")
    with new.writing() as staging:
        (staging / "new.txt").write_text("2")
    assert new.done() and not old.done()
    assert sorted(p.name for p in new.path.iterdir()) == [MANIFEST, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["u"]


def test_unit_without_manifest_is_not_done(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "accepted.jsonl").write_text("{}\n")
    assert not Unit(tmp_path / "u", "k").done()
    (tmp_path / "u" / MANIFEST).write_text("{not json")
    assert not Unit(tmp_path / "u", "k").done()


def test_clean_staging_removes_leftovers(tmp_path):
    unit = Unit(tmp_path / "stage" / "task", "k")
    staging = unit.begin()
    (staging / "x").write_text("x")
    clean_staging(tmp_path)
    assert not staging.exists()
