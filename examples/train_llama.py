"""Train a tiny Llama-style model built from the ops of examples/llama.opf, next to the same
model written in plain PyTorch, and check that the two loss curves agree.

    python examples/train_llama.py [--steps N] [--layers L] [--lr LR] [--seed S]

The opforge model: a token embedding (plain torch), ``L`` decoder blocks, each
``llama_block`` of llama.opf bound to its weights (``mod.llama_block.bind(...)``: dense weights
become trainable Parameters whose gradients come from the op's derived backward kernels), the
final ``rms_norm`` bound the same way, and a linear head (plain torch). The plain model computes
the same formulas with torch operations. Both start from identical weights, train with AdamW
on the same synthetic next-token batches (``x[t] = perm[x[t-2]]`` for a fixed permutation, two
random starting tokens per sequence: the model has to look back two positions, through attention),
and print their losses step by step. The exit status is 1 when the curves differ by more than
the tolerance of runtime/tolerances.py (``gradient_tolerance_for`` the block, in f32).

Without a GPU the kernels run through Triton's interpreter: at these sizes (D=32, H=2, S=16,
F=64, vocab 50, batch 4, two blocks) a step takes about 2.8 s on one CPU core, so the default 200
steps take about 9 minutes (the loss falls from 4.2 to about 0.8; the curves agree within 3e-5).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn

import opforge
from opforge.runtime.tolerances import Tol, compare, gradient_tolerance_for

SPEC = Path(__file__).resolve().parent / "llama.opf"
PLAIN_NAMES = {"norm.w": "norm"}     # an opforge model's parameter -> the plain model's, where they differ
BLOCK_WEIGHTS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "wg", "wu", "wd")


@dataclass(frozen=True)
class Config:
    vocab: int = 50
    dim: int = 32         # D
    heads: int = 2        # H (head dim E = D / H)
    seq: int = 16         # S
    ffn: int = 64         # F
    layers: int = 2
    batch: int = 4
    lr: float = 1e-2
    weight_decay: float = 0.01

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# -- weights, tables and data ---------------------------------------------------------------------
def initial_weights(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight of the model (f32), from one seed: both models start from these."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg.dim, cfg.ffn, cfg.vocab

    def normal(*shape, fan_in):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in)

    w = {"emb": torch.randn(V, D, generator=g) * 0.5}
    for i in range(cfg.layers):
        w |= {f"{i}.attn_norm": torch.ones(D), f"{i}.mlp_norm": torch.ones(D),
              f"{i}.wq": normal(D, D, fan_in=D), f"{i}.wk": normal(D, D, fan_in=D),
              f"{i}.wv": normal(D, D, fan_in=D), f"{i}.wo": normal(D, D, fan_in=D),
              f"{i}.wg": normal(F, D, fan_in=D), f"{i}.wu": normal(F, D, fan_in=D),
              f"{i}.wd": normal(D, F, fan_in=F)}
    w["norm"] = torch.ones(D)
    w["head"] = normal(V, D, fan_in=D)
    return w


def rotary_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, E] in the "rotate half" form llama.opf's rotary uses."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def batches(cfg: Config, steps: int, seed: int = 1):
    """``steps`` batches of (inputs, targets), each [batch, S] token ids: sequences with
    x[t] = perm[x[t-2]] for a fixed random permutation of the vocabulary, from two random
    tokens (so the next token depends on the one two positions back: attention must find it)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(cfg.vocab, generator=g)
    out = []
    for _ in range(steps):
        seq = torch.empty(cfg.batch, cfg.seq + 1, dtype=torch.long)
        seq[:, :2] = torch.randint(0, cfg.vocab, (cfg.batch, 2), generator=g)
        for t in range(2, cfg.seq + 1):
            seq[:, t] = perm[seq[:, t - 2]]
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


# -- the two models -----------------------------------------------------------------------------
class OpforgeLlama(torch.nn.Module):
    """Embedding and head in plain torch; the blocks and the final norm are opforge ops bound to
    their weights (each a BoundOp whose dense weights are Parameters)."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], mod):
        super().__init__()
        self.emb = torch.nn.Parameter(weights["emb"].clone())
        self.blocks = torch.nn.ModuleList(
            mod.llama_block.bind(**{n: weights[f"{i}.{n}"] for n in BLOCK_WEIGHTS}) for i in range(cfg.layers))
        self.norm = mod.rms_norm.bind(w=weights["norm"])
        self.head = torch.nn.Parameter(weights["head"].clone())
        cos, sin = rotary_tables(cfg.seq, cfg.head_dim)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb[ids]
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.norm(x, 1e-5) @ self.head.T


class TorchLlama(torch.nn.Module):
    """The same model in plain PyTorch operations."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.emb = torch.nn.Parameter(weights["emb"].clone())
        self.blocks = torch.nn.ModuleList()
        for i in range(cfg.layers):
            block = torch.nn.Module()
            for n in BLOCK_WEIGHTS:
                block.register_parameter(n, torch.nn.Parameter(weights[f"{i}.{n}"].clone()))
            self.blocks.append(block)
        self.norm = torch.nn.Parameter(weights["norm"].clone())
        self.head = torch.nn.Parameter(weights["head"].clone())
        cos, sin = rotary_tables(cfg.seq, cfg.head_dim)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    @staticmethod
    def rms_norm(x, w, eps=1e-5):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rotary(self, x):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * self.cos + torch.cat([-x2, x1], dim=-1) * self.sin

    def block(self, x, b):
        B, S, D = x.shape
        H, E = self.cfg.heads, self.cfg.head_dim

        def heads(t):
            return t.reshape(B, S, H, E).permute(0, 2, 1, 3)

        h = self.rms_norm(x, b.attn_norm)
        q, k, v = self.rotary(heads(h @ b.wq.T)), self.rotary(heads(h @ b.wk.T)), heads(h @ b.wv.T)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(E)
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
        o = (p @ v).permute(0, 2, 1, 3).reshape(B, S, D)
        x1 = x + o @ b.wo.T
        m = self.rms_norm(x1, b.mlp_norm)
        return x1 + (Fn.silu(m @ b.wg.T) * (m @ b.wu.T)) @ b.wd.T

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb[ids]
        for b in self.blocks:
            x = self.block(x, b)
        return self.rms_norm(x, self.norm) @ self.head.T


def compile_ops(namespace: str = "train_llama"):
    """llama.opf's rms_norm and llama_block (with the ops they call), compiled in f32."""
    return opforge.compile(SPEC, namespace=namespace, dtype="f32", ops=["rms_norm", "llama_block"])


def build(cfg: Config, seed: int = 0, mod=None) -> tuple[OpforgeLlama, TorchLlama, object]:
    """Both models from the same initial weights, and the compiled module."""
    mod = mod if mod is not None else compile_ops()
    weights = initial_weights(cfg, seed)
    return OpforgeLlama(cfg, weights, mod), TorchLlama(cfg, weights), mod


def loss_tolerance(mod) -> Tol:
    """The tolerance a loss curve is held to: the gradient tolerance of the block (f32), from
    the one table of runtime/tolerances.py."""
    return gradient_tolerance_for(mod.llama_block.graph)


def cross_entropy(model: torch.nn.Module, cfg: Config, ids, targets) -> torch.Tensor:
    return Fn.cross_entropy(model(ids).reshape(-1, cfg.vocab), targets.reshape(-1))


def train(model: torch.nn.Module, cfg: Config, data) -> list[float]:
    """AdamW over ``data``; the loss of each step (before its update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    for ids, targets in data:
        loss = cross_entropy(model, cfg, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config, batch) -> float:
    """The loss on a held-out batch (no gradient: the plain forward kernels)."""
    return cross_entropy(model, cfg, *batch).item()


@dataclass
class Run:
    cfg: Config
    ours: OpforgeLlama
    plain: TorchLlama
    mod: object
    losses_ours: list[float]
    losses_plain: list[float]
    eval_before: tuple[float, float]      # (opforge, pytorch) on the held-out batch
    eval_after: tuple[float, float]
    seconds: dict[str, float]

    @property
    def tolerance(self) -> Tol:
        return loss_tolerance(self.mod)

    def comparison(self):
        """The two loss curves compared (runtime/tolerances.compare at self.tolerance)."""
        return compare(torch.tensor(self.losses_ours, dtype=torch.float64),
                       torch.tensor(self.losses_plain, dtype=torch.float64), self.tolerance)

    def parameter_comparisons(self) -> dict:
        """Every parameter of the opforge model against the plain model's, after training."""
        plain = dict(self.plain.named_parameters())
        return {name: compare(p.detach(), plain[PLAIN_NAMES.get(name, name)].detach(), self.tolerance)
                for name, p in self.ours.named_parameters()}

    @property
    def max_diff(self) -> float:
        return max((abs(a - b) for a, b in zip(self.losses_ours, self.losses_plain)), default=0.0)


def run(cfg: Config, steps: int, seed: int = 0, mod=None) -> Run:
    """Build both models from the same weights and train each for ``steps`` steps on the same
    batches; the held-out batch is evaluated before and after."""
    t0 = time.perf_counter()
    ours, plain, mod = build(cfg, seed, mod)
    data = batches(cfg, steps + 1, seed=seed + 1)
    held_out, data = data[0], data[1:]
    before = (evaluate(ours, cfg, held_out), evaluate(plain, cfg, held_out))
    t1 = time.perf_counter()
    losses_ours = train(ours, cfg, data)
    t2 = time.perf_counter()
    losses_plain = train(plain, cfg, data)
    t3 = time.perf_counter()
    after = (evaluate(ours, cfg, held_out), evaluate(plain, cfg, held_out))
    return Run(cfg, ours, plain, mod, losses_ours, losses_plain, before, after,
               {"build": t1 - t0, "opforge": t2 - t1, "pytorch": t3 - t2})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=10, help="print every N-th step (and the last)")
    args = ap.parse_args(argv)
    cfg = Config(layers=args.layers, lr=args.lr)
    r = run(cfg, args.steps, args.seed)
    print(f"{cfg.layers} llama_block(s) D={cfg.dim} H={cfg.heads} S={cfg.seq} F={cfg.ffn} vocab={cfg.vocab} "
          f"batch={cfg.batch}, AdamW lr={cfg.lr}, {args.steps} steps")
    print(f"{'step':>5} {'opforge':>10} {'pytorch':>10} {'|diff|':>9}")
    for i, (a, b) in enumerate(zip(r.losses_ours, r.losses_plain)):
        if i % args.every == 0 or i == len(r.losses_ours) - 1:
            print(f"{i:>5} {a:>10.5f} {b:>10.5f} {abs(a - b):>9.2e}")
    print(f"held-out loss: before {r.eval_before[0]:.5f} (pytorch {r.eval_before[1]:.5f}), "
          f"after {r.eval_after[0]:.5f} (pytorch {r.eval_after[1]:.5f})")
    c, tol = r.comparison(), r.tolerance
    print(f"max |diff| {r.max_diff:.3e}; curves {'match' if c.ok else 'DIFFER'} ({c.message}; tolerance "
          f"rtol {tol.rtol:g}, atol {tol.atol:g} x rms, norm {tol.norm:g})")
    params = r.parameter_comparisons()
    bad = [name for name, pc in params.items() if not pc.ok]
    worst = max(params, key=lambda n: params[n].max_abs_err)
    print(f"parameters after training: {len(params) - len(bad)} of {len(params)} match; largest |diff| "
          f"{params[worst].max_abs_err:.2e} ({worst})" + (f"; differ: {', '.join(bad)}" if bad else ""))
    t = r.seconds
    print(f"time: build {t['build']:.1f} s, opforge {t['opforge']:.1f} s "
          f"({t['opforge'] / max(args.steps, 1) * 1e3:.0f} ms/step), pytorch {t['pytorch']:.1f} s")
    if not c.ok or bad:
        return 1
    if args.steps > 0 and not r.eval_after[0] < r.eval_before[0]:
        print("the held-out loss did not decrease")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
