"""DeepSpeed's shared-memory collectives for CPU training, prepared before DeepSpeed starts.

The first time DeepSpeed starts its communication backend on a machine without a GPU, it compiles
a C++ op (``deepspeed_shm_comm``: all-reduce through shared memory between the workers of one
node) into torch's extension cache: 30-50 s, and a C++ compiler is needed. Where no compiler is
installed (a slim container), that compilation fails and takes the training down with it. ``make
setup`` builds the op once at install time; :func:`prepare_shm_op` covers every other first
start (a new node, an empty cache): it builds the op quietly with one line of ours, and where it
cannot be built it tells DeepSpeed to do without it (gloo's own collectives, slower only between
several workers of one node) instead of failing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
BUILDER = "ShareMemCommBuilder"


def _built_before(name: str) -> bool:
    """Whether torch's extension cache already holds a compiled ``name``: in $TORCH_EXTENSIONS_DIR,
    else in the default cache's folder of any Python and torch build."""
    from torch.utils.cpp_extension import get_default_build_root

    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    pattern = f"{name}/{name}.so" if chosen else f"*/{name}/{name}.so"
    return any(Path(chosen or get_default_build_root()).glob(pattern))


def prepare_shm_op() -> bool:
    """Make DeepSpeed's CPU shared-memory op ready, or switch it off for this process; True when it
    is there to use. Does nothing where the accelerator is not the CPU."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    builder = accelerator.create_op_builder(BUILDER)
    compatible = deepspeed.ops.__compatible_ops__  # DeepSpeed's own table of the ops it may load
    if builder is None or not compatible.get(builder.NAME, False):
        return False
    if not _built_before(builder.NAME):
        log.info("compiling DeepSpeed's CPU shared-memory collectives (once on this machine, 30-50 s)")
    torch_builds = logging.getLogger("torch.utils.cpp_extension")  # its compiler notices: ours is the one line
    level = torch_builds.level
    torch_builds.setLevel(logging.ERROR)
    try:
        builder.load(verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: DeepSpeed would fail the same way
        compatible[builder.NAME] = False
        reason = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        log.warning("DeepSpeed's CPU shared-memory collectives could not be compiled (%s): training uses gloo's "
                    "collectives instead (install a C++ compiler, g++, for the faster path between workers of "
                    "one node)", reason[0][:200])
        return False
    finally:
        torch_builds.setLevel(level)
    return True
