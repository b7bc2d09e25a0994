"""studio.adapters.frozen: frozen layers keep less for the backward pass and give the same gradients."""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import LoraConfig

from studio.adapters import frozen


def _saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_frozen_conv_matches_autograd_and_keeps_no_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    conv.requires_grad_(False)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    ref = conv(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert frozen.keep_less(conv) == 1
    out, seen = _saved_bytes(lambda: conv(x))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert x.untyped_storage().data_ptr() not in seen  # the input is not kept
    conv.weight.requires_grad_(True)  # a conv that trains keeps autograd's path: its weight gets a gradient
    conv(x).sum().backward()
    assert conv.weight.grad is not None
    frozen.restore(conv)
    assert "forward" not in conv.__dict__


def test_micro_unet_same_loss_and_lora_gradients_with_less_kept():
    from studio.loading import load_pipeline

    pipe = load_pipeline("micro", dtype="fp32", device="cpu")
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    torch.manual_seed(1)
    for n, p in unet.named_parameters():  # non-zero up factors, so every LoRA gets a gradient through the next
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    size = unet.config.sample_size
    lat = torch.randn(2, unet.config.in_channels, size, size)
    emb = torch.randn(2, 8, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    params = [p for p in unet.parameters() if p.requires_grad]

    def run() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        out, seen = _saved_bytes(lambda: unet(lat, t, emb).sample)
        loss = out.square().mean()
        return loss.detach(), torch.autograd.grad(loss, params), sum(seen.values())

    loss_ref, grads_ref, kept_ref = run()
    swapped = frozen.keep_less(unet)
    assert swapped > 10
    loss, grads, kept = run()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert kept < 0.9 * kept_ref, (kept, kept_ref)
    frozen.restore(unet)
    assert run()[2] == kept_ref
