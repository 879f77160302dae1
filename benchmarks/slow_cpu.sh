#!/usr/bin/env bash
# Run a command as if on a 2-core CPU with AVX2 only and no bf16 instructions (the slowest machine
# the project promises to serve), on a faster Linux machine:
#   - PyTorch and oneDNN are capped at AVX2 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), so
#     get_cpu_capability() says AVX2, dtype auto picks fp32 and bf16 matmuls are emulated (slow);
#   - a cgroup-v1 CPU quota (root needed) cuts fp32 throughput to about 27.6 GFLOP/s per busy core,
#     what an AVX2-only 2-core EPYC measured (SLOW_CPU_QUOTA: share of one core per 100 ms, over
#     both cores; 52000 = 0.52 of a core, calibrated on a Zen 5 doing ~106 GFLOP/s per core).
# Start-up costs (Python imports, Ray) are slowed too, so timings come out pessimistic.
# Usage: benchmarks/slow_cpu.sh make demo
set -euo pipefail
quota="${SLOW_CPU_QUOTA:-52000}"
group=/sys/fs/cgroup/cpu/modecotd-slow-cpu
if [ ! -d /sys/fs/cgroup/cpu ]; then
    echo "slow_cpu.sh: needs the cgroup-v1 cpu controller at /sys/fs/cgroup/cpu" >&2
    exit 2
fi
mkdir -p "$group"
echo 100000 > "$group/cpu.cfs_period_us"
echo "$quota" > "$group/cpu.cfs_quota_us"
echo $$ > "$group/cgroup.procs"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
exec "$@"
