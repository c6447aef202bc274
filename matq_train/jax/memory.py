"""Whether a step fits: XLA's own estimate of each compiled width against the memory the devices have.

A host that runs out of memory does not raise: the kernel's OOM killer ends the process, mid-run.
So the trainer asks before the first step. Each width's gradient program is compiled for the run's
shapes (abstract, nothing allocated) and :meth:`~jax.stages.Compiled.memory_analysis` says the bytes
it needs beyond its inputs; what the earlier widths leave alive (the gradient sum, teachers'
logits) is added. The host's share is what Linux reports available, capped by the cgroup's limit;
an accelerator's is its allocator's limit less what is in use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

__all__ = ["available_bytes", "host_available_bytes", "program_bytes", "tree_bytes"]


def tree_bytes(tree) -> int:
    """Bytes of every array (or shape/dtype struct) in ``tree``."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def program_bytes(compiled) -> int | None:
    """Bytes a compiled program allocates beyond its inputs (temporaries and outputs), per device;
    None where the backend gives no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_left() -> int | None:
    """cgroup v2 memory limit less usage, where a limit is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def host_available_bytes() -> int | None:
    """Memory a new allocation on this host can get: MemAvailable, capped by the cgroup's remaining limit."""
    found = [b for b in (_meminfo_available(), _cgroup_left()) if b is not None]
    return min(found) if found else None


def available_bytes(devices: Iterable) -> int | None:
    """Memory available to each of ``devices`` (CPU devices share the host's equally); None if unknown."""
    devices = list(devices)
    if all(d.platform == "cpu" for d in devices):
        host = host_available_bytes()
        return None if host is None else host // len(devices)
    free = []
    for d in devices:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)
