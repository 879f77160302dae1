"""Which floating-point type a model computes in, picked for the hardware it lands on.

``auto`` (every stage's default) means bf16 where the hardware computes it natively (a CUDA
device with bf16, or a CPU with AVX512-BF16 or AMX under an AVX512 kernel set) and fp32
everywhere else. On a CPU without those instructions a bf16 matmul is emulated and runs tens of
times slower than fp32 (measured: 0.6 against 27.6 GFLOP/s on one AVX2 core), so an explicit
``bf16`` there still runs, with a warning that says how much slower. fp16 is never used on a CPU.

The choice is made where the model is loaded (a GPU worker and a CPU-only head differ), and the
result, with its reason, travels in the work's summary into the report.
"""
from __future__ import annotations

import functools
import logging
import platform
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

DTYPE_NAMES = ("auto", "bf16", "fp32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The dtype a piece of work computes in and why."""

    requested: str  # auto | bf16 | fp32, as configured
    dtype: str  # bf16 | fp32, as used
    device: str  # cpu | cuda
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def describe(self) -> str:
        return f"{self.requested} -> {self.dtype} ({self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_capability() -> str:
    """PyTorch's CPU kernel set (``AVX2``, ``AVX512``, ``DEFAULT``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matmuls natively, and the facts behind the answer."""
    capability = cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        instructions = [name for name, present in (("AVX512-BF16", avx512_bf16), ("AMX", amx)) if present]
        # PyTorch can be told to use a lower kernel set (ATEN_CPU_CAPABILITY); then the bf16
        # instructions go unused even where the CPU has them.
        native = bool(instructions) and capability.startswith("AVX512")
        if not instructions:
            return False, f"CPU {capability}, no AVX512-BF16 or AMX"
        if not native:
            return False, f"CPU {capability} kernels ({' and '.join(instructions)} present but unused at that level)"
        return True, f"CPU {capability}, {' and '.join(instructions)}"
    if machine in ("aarch64", "arm64"):
        native = "bf16" in _cpu_flags()
        return native, f"CPU {capability} (arm64){', BF16' if native else ', no BF16'}"
    return False, f"CPU {capability} ({machine})"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_device() -> str:
    """Where this process computes: a GPU Ray reserved for it, else the CPU.

    Inside a Ray actor (a teacher, an evaluator, a Tune trial, a training worker) only the GPUs Ray
    assigned count: since Ray 2.48 an actor that asked for no GPU still sees every GPU of its node,
    and loading onto one it did not reserve would crowd the actors that did. Ray narrows
    CUDA_VISIBLE_DEVICES to the reserved ones, so the first visible device is this actor's. Outside
    Ray (the driver, a benchmark, a script) a visible GPU is used."""
    if not torch.cuda.is_available():
        return "cpu"
    reserved = reserved_gpus()
    return "cuda" if reserved is None or reserved else "cpu"


def reserved_gpus() -> list | None:
    """The GPUs Ray reserved for this process when it is a Ray actor; None outside Ray (Ray is never
    imported here: a process that has not imported it is no Ray worker)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return list(ray.get_gpu_ids())


def resolve_dtype(requested: str, device: str | torch.device | None = None) -> Precision:
    """The dtype to compute in on ``device`` (default: :func:`default_device`)."""
    if requested not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {requested!r}; known: {', '.join(DTYPE_NAMES)}")
    device_type = torch.device(device).type if device is not None else default_device()
    if device_type == "cuda":
        native = torch.cuda.is_bf16_supported()
        facts = f"GPU {torch.cuda.get_device_name()}, {'bf16' if native else 'no bf16'}"
    else:
        native, facts = cpu_bf16_support()
    if requested == "auto":
        return Precision("auto", "bf16" if native else "fp32", device_type,
                         f"{facts}: bf16 is native" if native else f"{facts}: bf16 would be emulated")
    if requested == "bf16" and not native:
        warn_slow_bf16(facts, device_type)
        return Precision("bf16", "bf16", device_type, f"{facts}: bf16 as configured, emulated (slow)")
    return Precision(requested, requested, device_type, f"{facts}: as configured")


@functools.lru_cache(maxsize=None)
def warn_slow_bf16(facts: str, device_type: str) -> None:
    """Warn once per process that bf16 is emulated here, with the slow-down measured now."""
    slower = bf16_slowdown() if device_type == "cpu" else None
    how_much = f"a bf16 matmul ran {slower:.0f}x slower than fp32 here just now" if slower else "it is emulated"
    log.warning("dtype bf16 was asked for on a device without native bf16 (%s): %s, so this work will be "
                "about that much slower; set dtype: auto (fp32 here) or fp32", facts, how_much)


def bf16_slowdown(size: int = 256, seconds: float = 0.05) -> float:
    """How many times slower a square bf16 matmul runs than an fp32 one on this CPU (a quick probe)."""
    rates = {}
    for name, dtype in TORCH_DTYPES.items():
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        rates[name] = count / (time.perf_counter() - started)
    return rates["fp32"] / max(rates["bf16"], 1e-9)


def matmul_peak(dtype: str, seconds: float = 2.0, size: int = 1024, device: str | None = None) -> float:
    """FLOP/s of a square matmul in ``dtype`` on this process's threads (or the GPU)."""
    device = device or default_device()
    a = torch.randn(size, size, dtype=TORCH_DTYPES[dtype], device=device)
    b = torch.randn(size, size, dtype=TORCH_DTYPES[dtype], device=device)
    a @ b
    _sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(8):
            a @ b
        count += 8
        _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hardware_summary() -> dict:
    """What a benchmark or a report prints about the machine its numbers came from."""
    native, facts = cpu_bf16_support()
    summary = {"cpu_capability": cpu_capability(), "cpu_bf16_native": native, "cpu": facts,
               "threads": torch.get_num_threads()}
    if default_device() == "cuda":
        summary["gpu"] = torch.cuda.get_device_name()
    return summary
