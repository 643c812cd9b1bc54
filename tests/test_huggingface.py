"""The monitor inside the Hugging Face Trainer (tiny GPT-2 from a config, CPU, no downloads).

Oracles: the test's own float64 gradient norm, taken in post-accumulate-grad hooks (after the
last micro-batch of a step, before the Trainer clips), and the Trainer's own logged loss and
grad_norm."""

from __future__ import annotations

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from optiscope import load_run  # noqa: E402
from optiscope.integrations.huggingface import OptimizerMonitorCallback  # noqa: E402
from optiscope.optimizers import AdamW  # noqa: E402

pytestmark = pytest.mark.slow


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                     initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class _Oracle(transformers.TrainerCallback):
    """Σg² per tensor in float64 right after backward, before clipping; keyed by the step.

    ``poison``: {step: (tensor name, factor)} multiplies that tensor's gradient (NaN: one entry
    made NaN) after the step's last backward."""

    def __init__(self, model, poison=None):
        self.norm, self.sq, self.poison, self.next_step = {}, {}, poison or {}, 1
        names = dict((id(p), n) for n, p in model.named_parameters())
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=names[id(p)]: self._seen(name, p))

    def _seen(self, name, p):
        target = self.poison.get(self.next_step)
        if target is not None and target[0] == name:
            if math.isnan(target[1]):
                p.grad.view(-1)[0] = float("nan")
            else:
                p.grad.mul_(target[1])
        self.sq[name] = p.grad.double().square().sum().item()

    def on_step_begin(self, args, state, control, **kwargs):
        self.next_step = state.global_step + 1
        self.sq = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norm[state.global_step + 1] = math.sqrt(sum(self.sq.values()))


class _Crash(transformers.TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise RuntimeError("simulated crash")


def _trainer(tmp_path, model, callbacks, *, optimizer=None, max_steps=8, accumulation=1,
             logging_steps=2, save_steps=100, max_grad_norm=1.0, lr=5e-3, eval_steps=None):
    evaluate = {} if eval_steps is None else dict(eval_strategy="steps", eval_steps=eval_steps,
                                                  per_device_eval_batch_size=4)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, logging_steps=logging_steps,
        save_steps=save_steps, learning_rate=lr, max_grad_norm=max_grad_norm, report_to="none",
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, seed=0, **evaluate)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                eval_dataset=_Tokens(n=8, seed=1) if eval_steps else None,
                                callbacks=callbacks,
                                optimizers=(optimizer, None) if optimizer is not None else (None, None))


@pytest.mark.parametrize("bundled", [False, True])
def test_trainer_with_clipping_records_the_gradient_before_it(tmp_path, bundled):
    model = _model()
    oracle = _Oracle(model)
    optimizer = AdamW(model.parameters(), lr=5e-3) if bundled else None
    callback = OptimizerMonitorCallback(every=3)
    trainer = _trainer(tmp_path, model, [oracle, callback], optimizer=optimizer, accumulation=2,
                       eval_steps=4)
    trainer.train()
    run = load_run(tmp_path / "optiscope")  # the default log_dir

    steps, values = run.series("grad_norm")
    assert steps.tolist() == [1, 4, 7]
    for s, v in zip(steps, values):
        assert v == pytest.approx(oracle.norm[s], rel=1e-4)
    assert max(oracle.norm[s] for s in steps) > 1.0  # clipping did act on these steps
    coef_steps, coefs = run.series("clip_coef")
    assert coef_steps.tolist() == [1, 4, 7]
    for s, c in zip(coef_steps, coefs):
        assert c == pytest.approx(min(1.0, 1.0 / (oracle.norm[s] + 1e-6)), rel=1e-4)

    # every number the Trainer logged, at its logging step, sampled or not
    logged = [h for h in trainer.state.log_history if "loss" in h]
    steps, values = run.series("trainer/loss")
    assert steps.tolist() == [h["step"] for h in logged] == [2, 4, 6, 8]
    assert values.tolist() == pytest.approx([h["loss"] for h in logged], rel=1e-6)
    steps, values = run.series("trainer/grad_norm")
    assert steps.tolist() == [2, 4, 6, 8]
    for s, v in zip(steps, values):  # the Trainer's own pre-clip norm, against the oracle
        assert v == pytest.approx(oracle.norm[s], rel=1e-4)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    steps, values = run.series("trainer/eval_loss")
    assert steps.tolist() == [h["step"] for h in evals] == [4, 8]
    assert values.tolist() == pytest.approx([h["eval_loss"] for h in evals], rel=1e-6)
    assert run.last_step() == 8


@pytest.mark.parametrize("bundled", [False, True])
@pytest.mark.parametrize("mode", ["warn", "raise"])
def test_trainer_nan_in_one_tensor_under_clipping(tmp_path, bundled, mode):
    model = _model()
    poisoned = "transformer.h.0.mlp.c_fc.bias"
    oracle = _Oracle(model, poison={3: (poisoned, float("nan"))})
    optimizer = AdamW(model.parameters(), lr=5e-3) if bundled else None
    callback = OptimizerMonitorCallback(on_nonfinite=mode)
    trainer = _trainer(tmp_path, model, [oracle, callback], optimizer=optimizer, max_steps=6)
    trainer.train()
    run = load_run(tmp_path / "optiscope")
    alerts = [a for a in run.alerts if a.kind == "nonfinite_grads"]
    assert alerts[0].step == 3 and alerts[0].tensors == [poisoned]
    if mode == "raise":
        assert trainer.state.global_step == 3  # stopped at that step
        assert callback.monitor.stopped.tensors == [poisoned]
        # the update was not applied: the NaN clip coefficient would have poisoned every weight
        assert all(torch.isfinite(p).all() for p in model.parameters())
    else:
        assert trainer.state.global_step == 6


def test_trainer_crash_and_resume_from_checkpoint(tmp_path):
    model = _model()
    first = _Oracle(model, poison={5: ("transformer.wte.weight", 30.0)})  # the abandoned steps differ
    crashed = OptimizerMonitorCallback(every=1)
    trainer = _trainer(tmp_path, model, [first, crashed, _Crash(6)], max_steps=10, save_steps=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    crashed.monitor.writer.close()  # the crashed process's file is closed when it dies

    model = _model(seed=1)
    second = _Oracle(model)
    trainer = _trainer(tmp_path, model, [second, OptimizerMonitorCallback(every=1)], max_steps=10,
                       save_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    run = load_run(tmp_path / "optiscope")
    steps, values = run.series("grad_norm")
    assert steps.tolist() == list(range(1, 11))  # each step once
    truth = {**{s: first.norm[s] for s in range(1, 5)}, **second.norm}
    assert sorted(second.norm) == list(range(5, 11))
    assert abs(first.norm[5] / second.norm[5] - 1) > 0.1  # the superseded value was different
    for s, v in zip(steps, values):
        assert v == pytest.approx(truth[s], rel=1e-4)
    steps, _ = run.series("trainer/loss")
    assert steps.tolist() == [2, 4, 6, 8, 10]
