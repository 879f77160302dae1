"""The run folder's disk full, then made read-only in the middle of a stage: each time the run stops
with one line saying where and why, what was committed before stays as it was, and the same command
finishes once the disk is fine.

The run folder is a small tmpfs mounted in a mount namespace of the test's own (`unshare --mount`),
so this needs root, as the isolated-cluster tests do.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

CONFIG = {
    "name": "disk",
    "tasks": [{"name": "coins", "role": "seen", "source": {"kind": "generated", "family": "coin_flip", "size": 2},
               "sizes": {"train": 8, "fewshot": 3, "test": 3}}],
    "teacher": {"backend": "scripted"},
    "student": {"model": "builtin:tiny", "dtype": "fp32"},
    # the full fine-tune writes the whole tiny model (~13 MB): more than the small disk holds
    "distill": {"epochs": 1, "batch_size": 4, "max_length": 160, "lora": {"r": 2, "alpha": 4},
                "baselines": ["full_finetune"], "max_concurrent_jobs": 1, "max_failures": 0},
    "evaluation": {"max_new_tokens": 4},
    "resources": {"num_cpus": 2, "dashboard": False},
}
SMALL = "3m"  # holds the teacher's unit and an expert, not the full fine-tune


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None


def test_a_full_then_read_only_run_folder_stops_in_one_line_and_the_next_run_finishes(tiny_model_dir, tmp_path):
    if not can_mount():
        pytest.skip("a small tmpfs for the run folder needs root and unshare (a mount namespace)")
    config = tmp_path / "disk.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = f"{shlex.quote(sys.executable)} -m modecotd.cli run {config} --run-dir {run_dir} --stage teacher --stage distill"
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
set -u
mount -t tmpfs -o size={SMALL} modecotd-test-disk {run_dir}
{run} > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.code
find {run_dir} -name '.*.tmp' > {out}/leftover-full.txt
cp {run_dir}/rationales/coins/manifest.json {out}/teacher-manifest.json
mount -o remount,size=200m {run_dir}
{run} > {out}/ro.out 2> {out}/ro.err &
run=$!
for i in $(seq 1 1200); do grep -q "full_finetune started" {out}/ro.err && break; sleep 0.05; done
for i in $(seq 1 200); do mount -o remount,ro {run_dir} 2>/dev/null && break; sleep 0.05; done
wait $run; echo $? > {out}/ro.code
mount -o remount,rw {run_dir}
find {run_dir} -name '.*.tmp' > {out}/leftover-ro.txt
{run} > {out}/again.out 2> {out}/again.err; echo $? > {out}/again.code
cp {run_dir}/rationales/coins/manifest.json {out}/teacher-manifest-after.json
ls {run_dir}/experts/coins/manifest.json {run_dir}/baselines/full_finetune/manifest.json > {out}/done.txt
"""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    def result(name: str) -> tuple[int, list[str]]:
        errors = [line for line in (out / f"{name}.err").read_text().splitlines()
                  if line.startswith("modecotd: error:")]
        return int((out / f"{name}.code").read_text()), errors

    code, errors = result("full")
    assert code != 0 and len(errors) == 1, (out / "full.err").read_text()[-3000:]
    assert "No space left on device" in errors[0] and "full_finetune" in errors[0], errors[0]
    assert "run the same command again" in errors[0]
    code, errors = result("ro")  # made read-only once the full fine-tune's job has started
    assert code != 0 and len(errors) == 1, (out / "ro.err").read_text()[-3000:]
    assert "Read-only file system" in errors[0], errors[0]
    code, _ = result("again")
    assert code == 0, (out / "again.err").read_text()[-3000:]
    # the teacher's unit, committed before the disk filled, was kept (not redone) through both failures
    assert (out / "teacher-manifest.json").read_text() == (out / "teacher-manifest-after.json").read_text()
    assert len((out / "done.txt").read_text().split()) == 2
    # storage writes left no half-written temporary file, looked for while the small disk was still mounted
    for name in ("leftover-full.txt", "leftover-ro.txt"):
        assert (out / name).read_text() == "", (out / name).read_text()
