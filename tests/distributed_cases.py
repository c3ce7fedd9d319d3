"""The cases of tests/test_distributed.py, run in each rank of a gloo process group.

``run(rank, world, workdir)`` is the spawned entry point: it joins the group (a file store in
``workdir``), runs every case of ``CASES[world]`` and writes, per rank, a JSON record per case:
the placements DTensor reports, what the case expects, and each compared value's error against
the same computation in this one process without DTensor (plain tensors, the same ops). The
parent (pytest) asserts on the records, so a failing case names itself and the rest still run.
benchmarks/dist_nccl.sh runs the same cases on GPUs with NCCL (OPFORGE_DIST_BACKEND=nccl).
"""
from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import torch

LINEAR = """
op linear(x: f32[M, K], w: f32[N, K]) -> f32[M, N] { return x @ w.T }
op linear_24(x: f32[M, K], w: f32[N, K] @sparse(2:4)) -> f32[M, N] { return x @ w.T }
"""


def _close(a, b) -> dict:
    """``a`` against ``b`` with the f32 tolerance of runtime/tolerances.py."""
    from opforge.ir.types import DType
    from opforge.runtime.tolerances import TOLERANCES, compare
    from torch.distributed.tensor import DTensor
    if isinstance(a, DTensor):
        a = a.full_tensor()
    c = compare(a.detach(), b.detach(), TOLERANCES[DType.f32])
    return {"ok": c.ok, "message": c.message}


def _placements(t) -> list[str]:
    return [str(p) for p in t.placements]


class Ctx:
    def __init__(self, rank, world, mesh_shape):
        from torch.distributed.device_mesh import init_device_mesh
        import opforge
        self.rank, self.world = rank, world
        dev = "cuda" if os.environ.get("OPFORGE_DIST_BACKEND") == "nccl" else "cpu"
        self.device = dev
        if dev == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        names = ("dp", "tp")[: len(mesh_shape)]
        self.mesh = init_device_mesh(dev, mesh_shape, mesh_dim_names=names)
        self.llama = opforge.compile(_example("llama.opf"), dtype="f32", namespace="dist_llama")
        self.lin = opforge.compile(LINEAR, namespace="dist_linear")
        self.quant = opforge.compile(_example("quant_linear.opf"), dtype="f32", namespace="dist_quant")
        self.sparse = opforge.compile(_example("sparse_linear.opf"), dtype="f32", namespace="dist_sparse")

    def rand(self, *shape, scale=1.0):
        # the same values on every rank (seeded by the case), as distribute_tensor expects
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device)


def _example(name):
    import opforge
    return str(Path(opforge.__file__).resolve().parent / "examples" / name)


# -- the cases: each returns {check name: record}; records with "ok" are asserted ------------------
def _versus(c: Ctx, ours, theirs, inputs, names) -> dict:
    """``ours`` (opforge ops) on DTensors, forward and backward (a random cotangent), against
    the same call on plain tensors in this process ("y", "d<name>"), and against ``theirs``, the
    same math in torch's own ops on the same DTensors ("torch y", "torch d<name>": DTensor's own
    propagation; the values must agree, and the placements are recorded next to ours)."""
    from torch.distributed.tensor import distribute_tensor
    runs = {}
    for who, fn in (("ours", ours), ("torch", theirs)):
        leaves = [distribute_tensor(t, c.mesh, p).requires_grad_() for t, p in inputs]
        y = fn(*leaves)
        runs[who] = (y, leaves)
    g = c.rand(*runs["ours"][0].shape)
    for who, (y, leaves) in runs.items():
        (y * distribute_tensor(g, c.mesh, y.placements)).sum().backward()
    plain = [t.clone().requires_grad_() for t, _ in inputs]
    y1 = ours(*plain)
    (y1 * g).sum().backward()
    y, leaves = runs["ours"]
    ty, tleaves = runs["torch"]
    out = {"y": {**_close(y, y1), "placements": _placements(y)},
           "torch y": {**_close(y, ty.full_tensor()), "placements": _placements(ty)}}
    for name, d, t, p1 in zip(names, leaves, tleaves, plain):
        out[f"d{name}"] = {**_close(d.grad, p1.grad), "placements": _placements(d.grad)}
        out[f"torch d{name}"] = {**_close(d.grad, t.grad.full_tensor()), "placements": _placements(t.grad)}
    return out


def _torch_rms_norm(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w


def _torch_mlp(x, wg, wu, wd):
    return (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def dp_rms_norm(c: Ctx):
    """Data parallel: x split over the batch; the weight's gradient is a partial sum."""
    from torch.distributed.tensor import Replicate, Shard
    return _versus(c, c.llama.rms_norm, _torch_rms_norm,
                   [(c.rand(5, 3, 16), [Shard(0)]), (c.rand(16), [Replicate()])], ["x", "w"])


def sp_rms_norm(c: Ctx):
    """Sequence parallel: rms_norm on x split along the sequence, forward and backward."""
    from torch.distributed.tensor import Replicate, Shard
    return _versus(c, c.llama.rms_norm, _torch_rms_norm,
                   [(c.rand(2, 7, 16), [Shard(1)]), (c.rand(16), [Replicate()])], ["x", "w"])


def whole_axis_redistributes(c: Ctx):
    """rms_norm needs the whole D: x split along D is gathered first, the result replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    x, w = c.rand(2, 3, 16), c.rand(16)
    y = c.llama.rms_norm(distribute_tensor(x, c.mesh, [Shard(2)]), distribute_tensor(w, c.mesh, [Replicate()]))
    return {"y": {**_close(y, c.llama.rms_norm(x, w)), "placements": _placements(y)}}


def tp_column_linear(c: Ctx):
    """Column parallel: the weight split by output rows; the result split along N."""
    from torch.distributed.tensor import Replicate, Shard
    return _versus(c, c.lin.linear, lambda x, w: x @ w.T,
                   [(c.rand(6, 32), [Replicate()]), (c.rand(12, 32, scale=0.2), [Shard(0)])], ["x", "w"])


def tp_row_linear(c: Ctx):
    """Row parallel: x and the weight split along K; the result is a partial sum."""
    from torch.distributed.tensor import Shard
    return _versus(c, c.lin.linear, lambda x, w: x @ w.T,
                   [(c.rand(6, 33), [Shard(1)]), (c.rand(12, 33, scale=0.2), [Shard(1)])], ["x", "w"])


def tp_swiglu_mlp(c: Ctx):
    """The Llama MLP in Megatron form: gate and up column-parallel, down row-parallel; one op."""
    from torch.distributed.tensor import Replicate, Shard
    return _versus(c, c.llama.swiglu_mlp, _torch_mlp,
                   [(c.rand(2, 3, 16), [Replicate()]), (c.rand(24, 16, scale=0.25), [Shard(0)]),
                    (c.rand(24, 16, scale=0.25), [Shard(0)]), (c.rand(16, 24, scale=0.2), [Shard(1)])],
                   ["x", "wg", "wu", "wd"])


def tp_attention_heads(c: Ctx):
    """Attention split over heads (tensor parallel attention): causal flash attention per rank."""
    from torch.distributed.tensor import Shard, distribute_tensor
    q, k, v, g = (c.rand(1, 4, 9, 8) for _ in range(4))
    dq, dk, dv = (distribute_tensor(t, c.mesh, [Shard(1)]).requires_grad_() for t in (q, k, v))
    y = c.llama.attention(dq, dk, dv)
    (y * distribute_tensor(g, c.mesh, [Shard(1)])).sum().backward()
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    (c.llama.attention(q1, k1, v1) * g).sum().backward()
    out = {"y": {**_close(y, c.llama.attention(q, k, v)), "placements": _placements(y)}}
    for name, d, t in (("dq", dq, q1), ("dk", dk, k1), ("dv", dv, v1)):
        out[name] = {**_close(d.grad, t.grad), "placements": _placements(d.grad)}
    return out


def sequence_parallel_block(c: Ctx):
    """Megatron sequence parallelism: norm on S-split activations, the MLP tensor parallel, its
    partial sums reduce-scattered back to S-split; DTensor's redistributions in between."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    x, w = c.rand(2, 6, 16), c.rand(16)
    wg, wu, wd = c.rand(24, 16, scale=0.25), c.rand(24, 16, scale=0.25), c.rand(16, 24, scale=0.2)
    dx = distribute_tensor(x, c.mesh, [Shard(1)])
    h = c.llama.rms_norm(dx, distribute_tensor(w, c.mesh, [Replicate()]))
    h_placements = _placements(h)
    h = h.redistribute(c.mesh, [Replicate()])
    y = c.llama.swiglu_mlp(h, *(distribute_tensor(t, c.mesh, [Shard(a)]) for t, a in ((wg, 0), (wu, 0), (wd, 1))))
    y_placements = _placements(y)
    y = y.redistribute(c.mesh, [Shard(1)]) + dx
    want = c.llama.swiglu_mlp(c.llama.rms_norm(x, w), wg, wu, wd) + x
    return {"norm": {"ok": True, "placements": h_placements},
            "mlp": {"ok": True, "placements": y_placements},
            "y": {**_close(y, want), "placements": _placements(y)}}


def fsdp2_training(c: Ctx):
    """FSDP2: a norm + MLP module whose parameters feed opforge ops, fully_shard-ed, trained for
    three SGD steps on each rank's share of the batch; against the same module in one process
    on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    llama = c.llama

    class Block(torch.nn.Module):
        def __init__(self, gen):
            super().__init__()
            r = lambda *s, k=1.0: torch.nn.Parameter(torch.randn(*s, generator=gen) * k)  # noqa: E731
            self.norm = r(16)
            self.wg, self.wu, self.wd = r(24, 16, k=0.25), r(24, 16, k=0.25), r(16, 24, k=0.2)

        def forward(self, x):
            return x + llama.swiglu_mlp(llama.rms_norm(x, self.norm), self.wg, self.wu, self.wd)

    model = Block(torch.Generator().manual_seed(3)).to(c.device)
    ref = Block(torch.Generator().manual_seed(3)).to(c.device)
    fully_shard(model, mesh=c.mesh)
    sharded = {n: _placements(p) for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt1 = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = c.rand(3, 2 * c.world, 5, 16)
    losses = []
    for step in range(3):
        batch = data[step]
        local = batch.chunk(c.world)[c.rank]
        loss = (model(local) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss1 = (ref(batch) ** 2).mean()
        loss1.backward()
        opt1.step()
        opt1.zero_grad()
        losses.append((float(loss), float(loss1)))
    out = {"placements": {"ok": True, "placements": sorted(set(sum(sharded.values(), [])))},
           "losses": {"ok": True, "values": losses}}
    for (n, p), p1 in zip(model.named_parameters(), ref.parameters()):
        out[f"param {n}"] = {**_close(p, p1), "placements": _placements(p)}
    return out


def compiled_dtensor(c: Ctx):
    """torch.compile(fullgraph=True) of a function taking DTensors through opforge ops."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    x, w = c.rand(4, 3, 16), c.rand(16)
    wg, wu, wd = c.rand(24, 16, scale=0.25), c.rand(24, 16, scale=0.25), c.rand(16, 24, scale=0.2)
    llama = c.llama

    def f(x, w, wg, wu, wd):
        return llama.swiglu_mlp(llama.rms_norm(x, w), wg, wu, wd)

    torch._dynamo.reset()
    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [distribute_tensor(x, c.mesh, [Shard(0)])] + \
        [distribute_tensor(t, c.mesh, [Replicate()]) for t in (w, wg, wu, wd)]
    y = fc(*args)
    return {"y": {**_close(y, f(x, w, wg, wu, wd)), "placements": _placements(y)}}


def mesh2d_dp_tp(c: Ctx):
    """A 2 x 2 mesh: data parallel over "dp", the MLP tensor parallel over "tp"."""
    from torch.distributed.tensor import Replicate, Shard
    return _versus(c, c.llama.swiglu_mlp, _torch_mlp,
                   [(c.rand(4, 3, 16), [Shard(0), Replicate()]), (c.rand(24, 16, scale=0.25), [Replicate(), Shard(0)]),
                    (c.rand(24, 16, scale=0.25), [Replicate(), Shard(0)]), (c.rand(16, 24, scale=0.2), [Replicate(), Shard(1)])],
                   ["x", "wg", "wu", "wd"])


def uneven_batch(c: Ctx):
    """A batch of 3 over 4 ranks: DTensor gives one rank an empty shard."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    x, w = c.rand(3, 5, 16), c.rand(16)
    y = c.llama.rms_norm(distribute_tensor(x, c.mesh, [Shard(0)]), distribute_tensor(w, c.mesh, [Replicate()]))
    return {"y": {**_close(y, c.llama.rms_norm(x, w)), "placements": _placements(y)}}


def _refused(fn) -> dict:
    try:
        fn()
    except Exception as e:     # the CallError's words are the record
        from opforge.runtime.binding import CallError
        return {"ok": isinstance(e, CallError), "message": f"{type(e).__name__}: {e}"}
    return {"ok": False, "message": "was not refused"}


def bound_layers_sharded(c: Ctx):
    """Bound (packed) layers split across ranks with opforge.distributed.bind_sharded: each rank
    packs its shard; against the layer bound whole in one process (the same packing: shards
    hold whole groups), and the splits a layout or the op's rule cannot take are refused."""
    from opforge.distributed import bind_sharded
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    out = {}
    x = c.rand(5, 256)
    cases = [("int4 column", c.quant.linear_q4, "column", dict(w=c.rand(48, 256, scale=0.1))),
             ("int4 row", c.quant.linear_q4, "row", dict(w=c.rand(48, 256, scale=0.1))),
             ("int8 column with bias", c.quant.linear_int8, "column", dict(w=c.rand(48, 256, scale=0.1), bias=c.rand(48))),
             ("fp8 row", c.quant.linear_fp8, "row", dict(w=c.rand(48, 256, scale=0.1))),
             ("2:4 row", c.lin.linear_24, "row", dict(w=c.rand(48, 256, scale=0.1))),
             ("block column", c.sparse.linear_block_sparse, "column", dict(w=c.rand(64, 256, scale=0.1))),
             ("low rank row", c.sparse.linear_lowrank, "row", dict(w=c.rand(48, 16) @ c.rand(16, 256) * 0.02))]
    for name, op, style, weights in cases:
        layer = bind_sharded(op, c.mesh, style, **weights)
        xin = distribute_tensor(x, c.mesh, [Replicate()])
        y = layer(xin)
        whole = op.bind(**weights)(x)
        if name.startswith("low rank"):   # factors per shard: compare with the dense product
            whole = x @ weights["w"].T
        if name.startswith("fp8 row"):    # row scales per shard: each rank's pieces in one process
            whole = sum(op.bind(w=wr)(xr) for wr, xr in zip(weights["w"].chunk(c.world, 1), x.chunk(c.world, 1)))
        out[name] = {**_close(y, whole), "placements": _placements(y)}
    # a DTensor input already split along K goes in as it is (no redistribution)
    layer = bind_sharded(c.quant.linear_q4, c.mesh, "row", w=cases[1][3]["w"])
    y = layer(distribute_tensor(x, c.mesh, [Shard(1)]))
    out["int4 row, input split along K"] = {**_close(y, c.quant.linear_q4.bind(**cases[1][3])(x)),
                                            "placements": _placements(y)}
    out["int4 misaligned"] = _refused(lambda: bind_sharded(c.quant.linear_q4, c.mesh, "row", w=c.rand(48, 192)))
    out["2:4 misaligned"] = _refused(lambda: bind_sharded(c.lin.linear_24, c.mesh, "row", w=c.rand(48, 36)))
    out["row with a bias"] = _refused(lambda: bind_sharded(c.quant.linear_int8, c.mesh, "row", w=c.rand(48, 256),
                                                           bias=c.rand(48)))
    return out


def fsdp2_with_bound_layer(c: Ctx):
    """FSDP2 over a module holding a bound int4 layer: the trainable parameters are sharded,
    the packed buffers (frozen, not parameters) stay whole on every rank and unchanged."""
    from torch.distributed.fsdp import fully_shard
    llama, quant = c.llama, c.quant
    w = c.rand(16, 64, scale=0.2)

    class Model(torch.nn.Module):
        def __init__(self, gen):
            super().__init__()
            self.norm = torch.nn.Parameter(torch.randn(64, generator=gen))
            self.q4 = quant.linear_q4.bind(w=w)

        def forward(self, x):
            return self.q4(llama.rms_norm(x[None], self.norm)[0])

    model, ref = Model(torch.Generator().manual_seed(4)), Model(torch.Generator().manual_seed(4))
    packed = {n: b.clone() for n, b in model.named_buffers()}
    fully_shard(model, mesh=c.mesh)
    opt, opt1 = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
    data = c.rand(2, 2 * c.world, 64)
    for step in range(2):
        batch = data[step]
        (model(batch.chunk(c.world)[c.rank]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        (ref(batch) ** 2).mean().backward()
        opt1.step()
        opt1.zero_grad()
    from torch.distributed.tensor import DTensor
    bufs = dict(model.named_buffers())
    same = all(not isinstance(bufs[n], DTensor) and torch.equal(bufs[n], b) for n, b in packed.items())
    return {"norm": {**_close(model.norm, ref.norm), "placements": _placements(model.norm)},
            "packed buffers": {"ok": same and len(packed) == 3, "message": f"{sorted(packed)} whole and unchanged: {same}"}}


class _Fake:
    """A jitted kernel's stand-in: ``fn[grid](*args, **config)`` records the config."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(kw)


def autotune_agreement(c: Ctx):
    """One GEMM tuned on every rank with a timer that disagrees by rank (rank 0 favours big
    blocks, the others small ones, as noisy timings would):
    - one cache directory for all ranks (a node's user cache, or shared storage): one rank times
      every candidate under the cache's lock, the others wait and take its winner; all agree;
    - a directory per rank, OPFORGE_DIST_TUNE=collective: the ranks time disjoint shares of the
      candidates and all keep the fastest; only rank 0 persists it, and a fresh tuner takes it
      from rank 0 without timing;
    - a directory per rank and no collectives: each rank tunes alone, and they disagree (so the
      checks above can fail)."""
    import torch.distributed as dist
    from opforge.ir.tile import Launch
    from opforge.runtime.autotune import TUNED, Autotuner, Limits, tuning_candidates
    from opforge.runtime.cache import KernelCache
    from opforge.runtime.executor import PlanRunner
    from opforge.runtime.loader import load_kernel

    kernel = c.lin.linear.plan.steps[0][-1].kernel
    sizes = dict(M=2048, N=2048, K=2048)
    n = len(tuning_candidates(kernel, sizes, Limits()))

    def tune(cache_dir, timer):
        cache = KernelCache(Path(c.workdir, cache_dir))
        entry = load_kernel(kernel, cache)[1]
        tuner = Autotuner(cache, timer=timer, limits=Limits(), progress=False)
        cfg = tuner.choose(Launch(kernel), timer.fake, entry, sizes, [], PlanRunner.grid)
        return cfg, (entry / TUNED).exists()

    class Timer:
        def __init__(self):
            self.fake, self.count = _Fake(), 0

        def __call__(self, run):
            self.count += 1
            run()
            v = self.fake.calls[-1]
            volume = v["BLOCK_M"] * v["BLOCK_N"] * v["BLOCK_K"] * v.get("GROUP_M", 1) ** 0.01
            return 1.0 / volume if c.rank == 0 else volume / 1e9

    def never(run):
        raise AssertionError("timed a kernel whose choice was persisted")
    never.fake = _Fake()

    def everyone(x):
        out = [None] * c.world
        dist.all_gather_object(out, x)
        return out

    out = {}
    timer = Timer()
    cfg, _ = tune("shared", timer)
    chosen, counts = everyone(str(cfg)), everyone(timer.count)
    out["shared directory"] = {"ok": len(set(chosen)) == 1 and sorted(counts) == [0] * (c.world - 1) + [n],
                               "message": f"chosen {chosen}, timed {counts} of {n}"}
    again, _ = tune("shared", never)
    out["shared directory, reused"] = {"ok": str(again) == str(cfg), "message": f"{again} after {cfg}"}

    os.environ["OPFORGE_DIST_TUNE"] = "collective"
    try:
        timer = Timer()
        cfg, persisted = tune(f"own{c.rank}", timer)
        chosen, counts = everyone(str(cfg)), everyone(timer.count)
        out["collective"] = {"ok": len(set(chosen)) == 1 and sum(counts) == n and max(counts) <= -(-n // c.world)
                             and persisted == (c.rank == 0),
                             "message": f"chosen {chosen}, timed {counts} of {n}, persisted here: {persisted}"}
        again, _ = tune(f"own{c.rank}", never)
        out["collective, reused"] = {"ok": str(again) == str(cfg), "message": f"{again} after {cfg}"}
    finally:
        del os.environ["OPFORGE_DIST_TUNE"]
    dist.barrier()
    alone, _ = tune(f"alone{c.rank}", Timer())
    chosen = everyone(str(alone))
    out["alone"] = {"ok": len(set(chosen)) > 1, "message": f"each rank alone chose {chosen}"}
    return out


CASES = {
    2: ((2,), [dp_rms_norm, sp_rms_norm, whole_axis_redistributes, tp_column_linear, tp_row_linear,
               tp_swiglu_mlp, tp_attention_heads, sequence_parallel_block, fsdp2_training, compiled_dtensor,
               autotune_agreement, bound_layers_sharded, fsdp2_with_bound_layer]),
    4: ((2, 2), [mesh2d_dp_tp, autotune_agreement]),
    -4: ((4,), [uneven_batch, dp_rms_norm, fsdp2_training]),
}


def run(rank: int, key: int, workdir: str) -> None:
    import torch.distributed as dist
    mesh_shape, cases = CASES[key]
    world = abs(key)
    backend = os.environ.get("OPFORGE_DIST_BACKEND", "gloo")
    dist.init_process_group(backend, init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    try:
        c = Ctx(rank, world, mesh_shape)
        c.workdir = workdir
        records = {}
        for i, case in enumerate(cases):
            c.gen = torch.Generator().manual_seed(1000 + i)
            try:
                records[case.__name__] = case(c)
            except Exception:
                records[case.__name__] = {"error": {"ok": False, "message": traceback.format_exc()}}
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(records, indent=1))
    finally:
        dist.destroy_process_group()
