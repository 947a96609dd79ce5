"""A bf16 backbone runs, whatever the transformers release: every RMSNorm returns its input's dtype and computes
fp32 statistics times the fp32 weight with one cast at the end (transformers 5.17 returned fp32 there, which
broke the next bf16 projection; ``lsa_runtime.backbone.fix_fp32_norms`` mends that)."""

import torch

from lsa_runtime.backbone import load_backbone


def test_bf16_backbone_norms_cast_once_and_forward_runs():
    model, _ = load_backbone("tiny", dtype="bfloat16")
    norms = [m for m in model.modules() if type(m).__name__ == "DeepseekV4RMSNorm"]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # kept fp32 by from_pretrained
    gen = torch.Generator().manual_seed(0)
    for m in norms:
        x = torch.randn(2, 3, m.weight.shape[-1], generator=gen).to(torch.bfloat16)
        h = x.double()
        want = (m.weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
        got = m(x)
        assert got.dtype == torch.bfloat16
        # one rounding to bf16 at the end (fp32 vs float64 arithmetic may differ by one bf16 step)
        torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), rtol=8e-3, atol=1e-6)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_fixed_norms_survive_deepcopy():
    """A copied model's norms use the copy's weights (the fix is a bound method, rebound by deepcopy)."""
    import copy

    model, _ = load_backbone("tiny", dtype="bfloat16")
    twin = copy.deepcopy(model)
    norm = next(m for m in twin.modules() if type(m).__name__ == "DeepseekV4RMSNorm")
    with torch.no_grad():
        norm.weight.mul_(2.0)
    x = torch.randn(1, 2, norm.weight.shape[-1]).to(torch.bfloat16)
    original = next(m for m in model.modules() if type(m).__name__ == "DeepseekV4RMSNorm")
    torch.testing.assert_close(norm(x).float(), (2.0 * original(x).float()).to(torch.bfloat16).float())
