"""Small real models for trajectory tests: real gradients from a real loss, not random tensors."""

from __future__ import annotations

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """A one-block causal character transformer: embeddings, attention, MLP, layer norms, biases.

    The key projection has no bias: softmax is invariant to it, so its gradient is rounding
    noise, and Adam's normalisation turns noise of 1e-12 into full-size steps that no two
    correct implementations share.
    """

    def __init__(self, vocab: int = 23, dim: int = 16, seq: int = 9, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.norm(x))


def batches(n: int, vocab: int = 23, seq: int = 9, batch: int = 4, seed: int = 0):
    """``n`` (tokens, targets) pairs of a deterministic next-token task."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        yield tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def decay_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The usual two groups: matrices decay, vectors do not; the second at a different lr."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [dict(params=decay, lr=lr, weight_decay=weight_decay),
            dict(params=no_decay, lr=lr * 3, weight_decay=0.0)]


def train_steps(monitor, model: nn.Module, opt, steps: int, *, nan_at: int | None = None) -> None:
    """Trains ``model`` (a `TinyTransformer`) on ``batches(steps)`` under ``monitor``, logging
    each step's loss as the scalar ``loss``; at step ``nan_at`` (1-based) one entry of
    ``q.weight``'s gradient is NaN."""
    for step, (x, y) in enumerate(batches(steps), start=1):
        loss = loss_fn(model, x, y)
        opt.zero_grad()
        loss.backward()
        if step == nan_at:
            model.q.weight.grad[0, 0] = float("nan")
        opt.step()
        monitor.log_scalar("loss", loss)


def hooked_run(opt, model: nn.Module, steps: int, pre, post):
    """Trains ``model`` for ``steps`` batches under a strict monitor that samples every second
    step and every coordinate, with ``pre`` and ``post`` as the optimizer's step hooks (they
    record what the monitor is checked against); returns the closed monitor's history."""
    from optiscope import OptimizerMonitor

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    mon = OptimizerMonitor(opt, model=model, every=2, sample_size=10**9, strict=True)
    for x, y in batches(steps):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    mon.close()
    return mon.history
