"""Autotuning shared by the ranks of a torch.distributed job.

Every rank of an SPMD job runs the same kernels at the same sizes, so tuning on each is wasted
(a thousand ranks would time every candidate a thousand times) and, worse, the ranks could pick
different configurations from noisy timings. When a default process group is initialised with
more than one rank, the autotuner (runtime/autotune.py) therefore, per kernel and shape bucket:
- takes rank 0's persisted choice, broadcast to all (the other ranks do not read their cache);
- otherwise splits the candidates across the ranks, as Inductor's distributed autotuning does:
  rank r times candidates r, r + world, ...; the timings are gathered and every rank keeps the
  fastest; only rank 0 persists it (``tuned.json`` in its cache entry).
So the next run of the job tunes nothing, whether the cache directory is per node or one
directory on shared storage (OPFORGE_CACHE_DIR; entries are written under the cache's file lock,
and OPFORGE_CACHE_LOCK=soft uses lock files that work on network filesystems).
This needs every rank to reach the same untuned kernels in the same order (true of SPMD code);
OPFORGE_DIST_TUNE=0 makes each rank tune alone (a job whose ranks run different ops).
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


def current() -> Share | None:
    """The default process group's share, or None (one process, or OPFORGE_DIST_TUNE=0)."""
    if os.environ.get("OPFORGE_DIST_TUNE", "1") == "0":
        return None
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    return Share(dist.get_rank(), dist.get_world_size())
