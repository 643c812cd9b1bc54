"""``optiscope demo`` and ``optiscope compare``: a real model on real text, watched end to end.

The model is a small character-level (byte-level) GPT; the text is the Python standard library's
own source, which ships with every Python install, so the demo needs no download. One run trains
for about 2 minutes on a 2-core CPU with the live dashboard, and leaves a run directory with the
run log, TensorBoard events, ``report.html`` and ``trends.png``. ``compare`` trains the same
model on the same batches with several optimizers and writes one report that overlays them: loss
against step, and loss against the memory each optimizer's state takes.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OPTIMIZERS", "DemoConfig", "CharGPT", "stdlib_text", "train", "make_optimizer"]


# name -> (description, factory(params, lr)); lr=None takes the optimizer's demo default.
def _adamw(params, lr):
    from optiscope.optimizers import AdamW
    return AdamW(params, lr=lr or 3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _adam(params, lr):
    from optiscope.optimizers import Adam
    return Adam(params, lr=lr or 3e-3, betas=(0.9, 0.95))


def _adafactor(params, lr):
    from optiscope.optimizers import Adafactor
    if lr is None:  # its own relative step size, as in the paper
        return Adafactor(params)
    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False)


def _adadiag(params, lr, two_sided=False):
    from optiscope.optimizers import AdaDiag
    return AdaDiag(params, lr=lr or 3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                   update_proj_gap=200, two_sided=two_sided)


def _adafacdiag(params, lr):
    from optiscope.optimizers import AdafacDiag
    return AdafacDiag(params, lr=lr or 3e-3, beta1=0.9, weight_decay=0.1, update_proj_gap=200)


def _microadam(params, lr):
    from optiscope.optimizers import MicroAdam
    return MicroAdam(params, lr=lr or 1e-3, betas=(0.9, 0.999), weight_decay=0.1, m=10,
                     k_init=0.01)


def _torch_adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr or 3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr or 0.3, momentum=0.9)


OPTIMIZERS = {
    "adamw": ("optiscope.optimizers.AdamW, lr 3e-3, betas (0.9, 0.95), weight decay 0.1", _adamw),
    "adam": ("optiscope.optimizers.Adam, lr 3e-3, betas (0.9, 0.95)", _adam),
    "adafactor": ("optiscope.optimizers.Adafactor, relative step (lr=None)", _adafactor),
    "adadiag": ("optiscope.optimizers.AdaDiag, lr 3e-3, betas (0.9, 0.95), weight decay 0.1, "
                "bases refreshed every 200 steps", _adadiag),
    "adadiag++": ("optiscope.optimizers.AdaDiag(two_sided=True), as adadiag, both sides rotated",
                  lambda params, lr: _adadiag(params, lr, two_sided=True)),
    "adafacdiag": ("optiscope.optimizers.AdafacDiag, lr 3e-3, beta1 0.9, weight decay 0.1, "
                   "bases refreshed every 200 steps", _adafacdiag),
    "microadam": ("optiscope.optimizers.MicroAdam, lr 1e-3, m 10, k 1%, weight decay 0.1: "
                  "top-k window and 4-bit error feedback", _microadam),
    "torch-adamw": ("torch.optim.AdamW, as adamw: a foreign optimizer the monitor probes",
                    _torch_adamw),
    "sgd": ("torch.optim.SGD, lr 0.3, momentum 0.9: no second moment", _sgd),
}


def make_optimizer(name: str, params, lr: float | None = None) -> torch.optim.Optimizer:
    """The demo's optimizer ``name`` (a key of `OPTIMIZERS`) over ``params``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optiscope: unknown optimizer {name!r}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name][1](params, lr)


@dataclass
class DemoConfig:
    """What one demo run trains. The defaults take about 2 minutes on a 2-core CPU."""

    steps: int = 1500
    batch: int = 16
    context: int = 64
    dim: int = 128
    layers: int = 3
    heads: int = 4
    every: int = 5
    seed: int = 0
    lr: float | None = None
    text_bytes: int = 2_000_000


class CharGPT(nn.Module):
    """A small causal transformer over bytes: token and position embeddings, pre-norm blocks of
    attention and MLP, a final norm and an untied head."""

    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 3, heads: int = 4,
                 context: int = 64):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: bytes, n: int, *, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> bytes:
        """Continues ``prompt`` by ``n`` sampled bytes."""
        out = list(prompt)
        for _ in range(n):
            tokens = torch.tensor([out[-self.context:]])
            logits = self(tokens)[0, -1] / temperature
            out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=generator)))
        return bytes(out[len(prompt):])


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def stdlib_text(limit: int = 2_000_000) -> bytes:
    """Up to ``limit`` bytes of the standard library's ``.py`` files, in a fixed order.

    Raises:
        FileNotFoundError: this Python ships no standard library sources (some embedded or
            stripped builds), naming the directory that was searched.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    if size < 100_000:
        raise FileNotFoundError(f"optiscope: found only {size} bytes of Python source under "
                                f"{root}; the demo trains on the standard library's source, "
                                "which this Python install lacks")
    return b"".join(chunks)[:limit]


class _Batches:
    """Random windows of the training text; a fixed held-out tail for validation."""

    def __init__(self, text: bytes, context: int, batch: int, seed: int):
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(data) * 0.95)
        self.train, self.val = data[:split], data[split:]
        self.context, self.batch = context, batch
        self.generator = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.context + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def next(self):
        starts = torch.randint(0, len(self.train) - self.context - 1, (self.batch,),
                               generator=self.generator)
        return self._windows(self.train, starts)

    def validation(self, n: int = 64):
        starts = torch.linspace(0, len(self.val) - self.context - 2, n).long()
        return self._windows(self.val, starts)


def _loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The demo's learning-rate schedule over ``steps``: linear warm-up over the first 5 %, then
    cosine decay to 10 % of the base rate."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, data: "_Batches") -> torch.Tensor:
    """One demo training step on the next batch of ``data``: the loss (returned), its gradient
    clipped to norm 1, the optimizer's step and the schedule's (``sched`` None: no schedule)."""
    tokens, targets = data.next()
    loss = _loss(model, tokens, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    return loss


@dataclass
class DemoResult:
    """What one run reached."""

    optimizer: str
    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    val_loss: float
    state_bytes: int
    n_params: int
    sample: bytes


def train(optimizer: str, run_dir: str | Path, config: DemoConfig | None = None, *,
          console=None, text: bytes | None = None, title: str | None = None,
          dashboard: bool = True) -> DemoResult:
    """Trains `CharGPT` with ``optimizer`` under an `OptimizerMonitor` writing ``run_dir``.

    Args:
        optimizer: a key of `OPTIMIZERS`.
        run_dir: the run directory (must not hold a run yet).
        config: model, batch and schedule (default `DemoConfig()`).
        console: the rich Console to draw on (default: stdout's).
        text: the training text (default: `stdlib_text`).
        title: the dashboard's title (default: the run directory).
        dashboard: show the dashboard (live on a terminal, one line per sample otherwise).
    """
    from optiscope import OptimizerMonitor
    from optiscope.dashboards.console import ConsoleDashboard

    config = config or DemoConfig()
    torch.manual_seed(config.seed)
    data = _Batches(text if text is not None else stdlib_text(config.text_bytes),
                    config.context, config.batch, config.seed)
    model = CharGPT(dim=config.dim, layers=config.layers, heads=config.heads,
                    context=config.context)
    opt = make_optimizer(optimizer, model.parameters(), config.lr)
    sched = (schedule(opt, config.steps)  # else a relative step size
             if all(g.get("lr") is not None for g in opt.param_groups) else None)
    freeze = max(2, config.steps // 4) if config.steps >= 8 else None
    start = time.perf_counter()
    mon = OptimizerMonitor(opt, model=model, every=config.every, log_dir=run_dir,
                           freeze_probe=freeze, quant_probes=True, range_probes=True,
                           console=ConsoleDashboard(console, total_steps=config.steps,
                                                    title=title or str(run_dir))
                           if dashboard else False)
    with mon:
        loss = torch.zeros(())
        for step in range(1, config.steps + 1):
            if step == config.steps:
                mon.sample_next()  # the final step's metrics, and the evaluation after it
            loss = train_step(model, opt, sched, data)
            mon.log_scalar("loss", loss)
        model.eval()
        with torch.no_grad():
            val = float(_loss(model, *data.validation()))
        mon.log_scalar("val_loss", val)
    seconds = time.perf_counter() - start
    history = mon.history
    _, state = history.series("state_bytes", "global")
    sample = model.generate(b"def ", 160, generator=torch.Generator().manual_seed(config.seed))
    return DemoResult(optimizer, Path(run_dir), config.steps, seconds, loss.item(), val,
                      int(state[-1]) if len(state) else 0, history.meta["n_params"], sample)


def fresh_dir(base: str | Path) -> Path:
    """``base`` if it holds no run yet, else ``base-2``, ``base-3``, ..."""
    base = Path(base)
    candidate, n = base, 1
    while (candidate / "runlog.jsonl").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
