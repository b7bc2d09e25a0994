"""The trainer's lean LoRA forward (studio.adapters.fast) equals PEFT's, value and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear

from studio.adapters import fast


def _model(seed: int = 0, **lora: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8, bias=False))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="gaussian", **lora)
    inject_adapter_in_model(cfg, m, adapter_name="default")
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:  # PEFT starts B at zero: make the adapter do something
            torch.nn.init.normal_(p, std=0.3)
    return m


def _run(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = m(x)
    (y.square().sum()).backward()
    grads = [p.grad.clone() for n, p in m.named_parameters() if p.requires_grad] + [x.grad.clone()]
    return y.detach(), grads


@pytest.mark.parametrize("merge_max", [0, fast.MERGE_MAX_IN], ids=["low-rank path", "weight path"])
@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"lora_dropout": 0.5}])
def test_fast_forward_equals_peft(lora, merge_max, monkeypatch):
    monkeypatch.setattr(fast, "MERGE_MAX_IN", merge_max)
    x = torch.randn(5, 3, 12)
    ref, fast_m = _model(**lora), _model(**lora)
    assert fast.speed_up(fast_m) == 2
    torch.manual_seed(1)
    y_ref, g_ref = _run(ref, x)
    torch.manual_seed(1)  # the same dropout draws where PEFT's forward runs (the fast path hands it back)
    y_fast, g_fast = _run(fast_m, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fast, g_ref):  # the weight path sums its products in another order: float rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_adapters_off_and_merged_fall_back_to_peft():
    m = _model()
    x = torch.randn(4, 12)
    fast.speed_up(m)
    with_adapter = m(x)
    for layer in m.modules():
        if isinstance(layer, LoraLinear):
            layer.enable_adapters(False)
    base = m(x)
    assert not torch.allclose(base, with_adapter)
    plain = torch.nn.Sequential(m[0].base_layer, m[1], m[2].base_layer)
    torch.testing.assert_close(base, plain(x))
    for layer in m.modules():
        if isinstance(layer, LoraLinear):
            layer.enable_adapters(True)
            layer.merge()
    torch.testing.assert_close(m(x), with_adapter, rtol=1e-5, atol=1e-5)


def test_restore_gives_peft_layers_back_and_same_state_dict():
    m = _model()
    keys = list(m.state_dict())
    assert fast.speed_up(m) == 2 and all(type(layer) is fast.FastLoraLinear for layer in (m[0], m[2]))
    assert list(m.state_dict()) == keys
    assert fast.restore(m) == 2 and all(type(layer) is LoraLinear for layer in (m[0], m[2]))
