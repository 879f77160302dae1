"""dtype auto: bf16 only where the hardware computes it natively; a warning with the measured
slow-down when bf16 is forced on a CPU without it."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types

import pytest

from modecotd import precision
from modecotd.precision import resolve_dtype


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "CPU AVX2, no AVX512-BF16 or AMX"))
    precision.warn_slow_bf16.cache_clear()
    yield
    precision.warn_slow_bf16.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_bf16(cpu_without_bf16):
    chosen = resolve_dtype("auto", "cpu")
    assert (chosen.dtype, chosen.requested, chosen.device) == ("fp32", "auto", "cpu")
    assert "AVX2" in chosen.reason and "emulated" in chosen.reason


def test_auto_is_bf16_on_a_cpu_with_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "CPU AVX512, AVX512-BF16"))
    chosen = resolve_dtype("auto", "cpu")
    assert chosen.dtype == "bf16" and "native" in chosen.reason


def test_forced_bf16_runs_with_a_warning_saying_how_much_slower(cpu_without_bf16, monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 46.0)
    with caplog.at_level(logging.WARNING, logger="modecotd.precision"):
        chosen = resolve_dtype("bf16", "cpu")
        resolve_dtype("bf16", "cpu")  # warned once per process
    assert chosen.dtype == "bf16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "46x slower" in warnings[0] and "dtype: auto" in warnings[0]


def test_fp32_is_kept_as_asked_and_unknown_names_are_refused():
    assert resolve_dtype("fp32", "cpu").dtype == "fp32"
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        resolve_dtype("fp16", "cpu")


def test_a_cpu_capped_at_avx2_kernels_gets_fp32():
    """With PyTorch limited to AVX2 kernels (as on an AVX2-only CPU) bf16 would be emulated."""
    code = ("import json; from modecotd.precision import resolve_dtype, hardware_summary; "
            "p = resolve_dtype('auto', 'cpu'); print(json.dumps([p.dtype, hardware_summary()['cpu_capability']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}).stdout
    assert json.loads(out.splitlines()[-1]) == ["fp32", "AVX2"]


def test_the_bf16_probe_measures_a_ratio():
    assert precision.bf16_slowdown(size=64, seconds=0.01) > 0


def test_a_loaded_model_says_what_it_computes_in(tiny_model_dir, cpu_without_bf16):
    from modecotd.models import load_lm

    model = load_lm(tiny_model_dir, "auto")
    assert model.precision.dtype == "fp32" and next(model.parameters()).dtype == model.precision.torch_dtype


# --- devices by reservation: a Ray actor computes on a GPU only when Ray reserved one for it ---------


def test_outside_ray_a_visible_gpu_is_used(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # a process that never imported Ray
    assert precision.reserved_gpus() is None and precision.default_device() == "cuda"


def test_without_a_visible_gpu_the_cpu(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    assert precision.default_device() == "cpu"


def test_a_ray_actor_that_reserved_no_gpu_stays_on_the_cpu_though_it_sees_one(ray_cluster):
    """Ray 2.48+ leaves a node's GPUs visible to an actor that asked for none: such an actor must not
    load onto GPU 0. Checked in a real actor of the local Ray, its GPU made visible by a patch; the
    driver (no actor) keeps using a visible GPU."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def devices(self):
            import torch

            from modecotd import precision as inside

            torch.cuda.is_available = lambda: True  # this actor's process only: it sees a GPU
            return inside.reserved_gpus(), inside.default_device()

    probe = Probe.remote()
    try:
        assert ray.get(probe.devices.remote()) == ([], "cpu")
    finally:
        ray.kill(probe)


def test_the_driver_uses_a_visible_gpu_with_ray_running(ray_cluster, monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    assert precision.reserved_gpus() is None and precision.default_device() == "cuda"


def test_an_actor_given_a_gpu_uses_it(monkeypatch):
    """The reserved list as Ray gives it to an actor that asked for a GPU (no GPU here to reserve)."""
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: True, get_gpu_ids=lambda: [3],
        get_runtime_context=lambda: types.SimpleNamespace(get_actor_id=lambda: "actor"))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    assert precision.reserved_gpus() == [3] and precision.default_device() == "cuda"
    fake_ray.get_gpu_ids = lambda: []
    assert precision.default_device() == "cpu"
