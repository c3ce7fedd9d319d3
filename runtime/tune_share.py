"""Autotuning shared by processes: a job's ranks, or any processes using one cache directory.

By default (no collectives, so nothing can hang): tuning a kernel at a shape bucket holds the
cache's file lock for that entry and bucket (runtime/cache.py); a process that finds it held
waits, then takes the persisted winner instead of timing. So the ranks of a node (they share the
user cache directory) tune each kernel once between them, and a cluster tunes it once if
``OPFORGE_CACHE_DIR`` is one directory on shared storage (``OPFORGE_CACHE_LOCK=soft`` for a
network filesystem without ``flock``; a lock held past ``TUNE_LOCK_TIMEOUT_S`` is given up and
the kernel tuned anyway). Ranks with separate cache directories tune separately and may choose
differently (the results are the same up to the order of the sums).

``OPFORGE_DIST_TUNE=collective`` adds, when a default process group with more than one rank is
initialised, tuning by collectives, as Inductor's distributed autotuning does: per kernel and
bucket, rank 0's persisted choice is broadcast; untuned, rank r times candidates r, r + world,
...; the timings are gathered and every rank keeps the fastest; only rank 0 persists it. That
needs every rank to reach the same untuned kernels at the same buckets in the same order:
strictly SPMD code with the same local sizes on every rank (DTensor's uneven shards break it,
and so does code that runs some ops on some ranks); otherwise the ranks hang in the collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Share:
    rank: int
    world: int
    group: Any = None

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def mine(self, n: int) -> range:
        """The indices of ``n`` candidates this rank times."""
        return range(self.rank, n, self.world)


TUNE_LOCK_TIMEOUT_S = 900.0


def current() -> Share | None:
    """The default process group's share under OPFORGE_DIST_TUNE=collective, else None."""
    if os.environ.get("OPFORGE_DIST_TUNE", "") != "collective":
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    return Share(dist.get_rank(), dist.get_world_size())
