"""The memory table counts what the optimizers really allocate: the meta-device count equals the
state a real step leaves behind, and the model shapes are the models' own."""

from __future__ import annotations

import pytest
import torch

from optiscope.bench.memory import MEMORY_MODELS, MEMORY_OPTIMIZERS, llama_shapes, state_bytes


@pytest.mark.parametrize("slug", list(MEMORY_OPTIMIZERS()))
def test_meta_count_equals_the_state_a_real_step_allocates(slug):
    opt_spec = MEMORY_OPTIMIZERS()[slug]
    shapes = ((300, 40), (40,), (7, 3, 5), (1,), (5000,))
    counted, per_key = state_bytes(opt_spec, shapes)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=opt_spec.dtype)) for s in shapes]
    opt = opt_spec.build(params)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(opt_spec.steps):
        opt.step()
    real: dict[str, int] = {}
    for p in params:
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                real[key] = real.get(key, 0) + value.untyped_storage().nbytes()
    shared = getattr(opt, "shared_state_bytes", None)
    if shared is not None and shared():
        real["shared"] = int(shared())
    assert per_key == real
    assert counted == sum(real.values())


def test_model_shapes_have_the_published_parameter_counts():
    assert MEMORY_MODELS["gpt2-small"].params == 124_439_808
    assert MEMORY_MODELS["llama-7b"].params == 6_738_415_616  # Llama-2-7B
    assert 1.3e9 < MEMORY_MODELS["llama-1.3b"].params < 1.4e9
    assert len(llama_shapes(4096, 32, 11008)) == 2 + 32 * 9 + 1


def test_adamw_fp32_is_8_bytes_per_parameter_plus_step_counters():
    total, per_key = state_bytes(MEMORY_OPTIMIZERS()["adamw-fp32"], MEMORY_MODELS["gpt2-small"].shapes)
    n = MEMORY_MODELS["gpt2-small"].params
    assert per_key["exp_avg"] == per_key["exp_avg_sq"] == 4 * n
    assert total - 8 * n == per_key["step"] < 1000
