"""OptimizerMonitor's ``state_bytes``: per tensor, per state key and global, judged against the
storages' own byte counts (shared storage counted once), and measured again when the state's
tensors change (`StateWatch`)."""

from __future__ import annotations

import torch

from models import TinyTransformer, batches, loss_fn
from optiscope import OptimizerMonitor
from optiscope.optimizers import AdamW


def test_state_bytes_per_tensor_per_key_and_global():
    model = TinyTransformer()
    opt = AdamW(model.parameters(), amsgrad=True, backend="torch")
    mon = OptimizerMonitor(opt, model=model, strict=True)
    x, y = next(batches(1))
    loss_fn(model, x, y).backward()
    opt.step()
    mon.close()
    h = mon.history
    total = 0
    for n, p in model.named_parameters():
        expected = sum(t.untyped_storage().nbytes() for t in opt.state[p].values())
        assert h.series("state_bytes", n)[1][0] == expected
        total += expected
    assert h.series("state_bytes", "global")[1][0] == total
    n_params = sum(p.numel() for p in model.parameters())
    assert h.series("state_bytes", "key/exp_avg_sq")[1][0] == 4 * n_params
    assert h.series("state_bytes", "key/step")[1][0] == 4 * len(list(model.parameters()))


def test_state_bytes_counts_shared_storage_once():
    class Aliasing(torch.optim.Optimizer):
        """Keeps two views of one buffer in its state."""

        def __init__(self, params):
            super().__init__(params, dict(lr=0.1))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if not self.state[p]:
                        buf = torch.zeros(2 * p.numel())
                        self.state[p]["a"], self.state[p]["b"] = buf[: p.numel()], buf[p.numel():]
                    p.sub_(p.grad, alpha=g["lr"])

    p = torch.nn.Parameter(torch.ones(10))
    opt = Aliasing([p])
    mon = OptimizerMonitor(opt, strict=True)
    p.grad = torch.ones(10)
    opt.step()
    mon.close()
    assert mon.history.series("state_bytes", "global")[1][0] == 80


def test_state_bytes_follow_a_state_tensor_replaced_between_samples():
    """state_bytes is measured again only when the state's tensors change: a tensor replaced by
    a larger one, a new key, a Python step count that changes at every step (no change)."""

    class Growing(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=0.1))
            self.calls = 0

        @torch.no_grad()
        def step(self, closure=None):
            self.calls += 1
            for g in self.param_groups:
                for j, p in enumerate(g["params"]):
                    state = self.state[p]
                    state["step"] = self.calls  # a Python int: not state bytes
                    if "buf" not in state or (self.calls == 4 and j == 0):
                        state["buf"] = torch.zeros(p.numel() * self.calls)
                    if self.calls == 6 and j == 1:
                        state["extra"] = torch.zeros(7, dtype=torch.float64)
                    p.sub_(p.grad, alpha=g["lr"])

    params = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(3))]
    opt = Growing(params)
    mon = OptimizerMonitor(opt, every=1, strict=True)
    expected = {}
    for step in range(1, 8):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        expected[step] = [sum(t.untyped_storage().nbytes() for t in opt.state[p].values()
                              if isinstance(t, torch.Tensor)) for p in params]
    mon.close()
    h = mon.history
    for j in range(2):
        assert list(h.series("state_bytes", f"group0.param{j}")[1]) == [
            expected[s][j] for s in range(1, 8)]
    assert list(h.series("state_bytes")[1]) == [sum(expected[s]) for s in range(1, 8)]
    assert expected[4][0] == 4 * 40 and expected[7][1] == 12 + 56
    assert list(h.series("state_bytes", "key/extra")[1]) == [56, 56]


def test_a_state_watch_sees_a_freed_tensor_replaced_even_at_the_same_id():
    from optiscope.monitor.statewatch import StateWatch

    p = torch.nn.Parameter(torch.ones(3))
    state = {p: {"a": torch.zeros(10), "step": 1}}
    watch = StateWatch()
    assert watch.changed(state)
    state[p]["step"] = 2  # not a tensor: no change
    assert not watch.changed(state)
    for _ in range(20):  # new tensors, some of which may reuse a freed one's id
        del state[p]["a"]
        state[p]["a"] = torch.zeros(20)
        assert watch.changed(state)
        assert not watch.changed(state)
