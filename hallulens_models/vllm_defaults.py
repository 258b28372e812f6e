"""vLLM engine defaults that let the embedded model run on the machines `make install` supports.

On vLLM's CPU platform `gpu_memory_utilization` is the share of the machine's RAM the engine
reserves, and it must fit in the memory free at start: the harness's default 0.9 fails on any
machine already using a tenth of its RAM. When the user sets neither it nor a KV cache size, a
CPU engine gets 40 % of the memory available at start instead, split between the harness's
data-parallel replicas (they share the machine). GPU engines are left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

CPU_SHARE_OF_AVAILABLE = 0.4
_SIZE_ARGS = ("gpu_memory_utilization", "kv_cache_memory_bytes")


def cpu_memory_default(engine_args: Mapping[str, object]) -> dict[str, float]:
    """`{"gpu_memory_utilization": share}` to add for a CPU engine, else `{}`."""
    if any(name in engine_args for name in _SIZE_ARGS) or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    import psutil

    memory = psutil.virtual_memory()
    replicas = max(1, int(engine_args.get("data_parallel_size") or 1))  # type: ignore[call-overload]
    available = CPU_SHARE_OF_AVAILABLE * memory.available / memory.total / replicas
    share = round(max(0.05, min(0.9, available)), 2)
    log.info(
        "vLLM on CPU: gpu_memory_utilization (the share of RAM it reserves) set to %.2f, %d%% of "
        "the memory available now; pass gpu_memory_utilization= to choose",
        share,
        CPU_SHARE_OF_AVAILABLE * 100,
    )
    return {"gpu_memory_utilization": share}
