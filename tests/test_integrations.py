"""The registry's constructors in the frameworks that consume them; GPU-only checks (skipped without CUDA)."""

import pytest
import torch

from mabn.norms import MABN2d, NormContext, build_norm, registered_norms


@pytest.mark.detectron2
def test_detectron2_get_norm_accepts_registry_ctors():
    """detectron2's get_norm takes a callable: every registered constructor goes through unchanged."""
    layers = pytest.importorskip("detectron2.layers", reason="detectron2 not installed (MABN_D2_SOURCE=skip?)")
    for name in registered_norms():
        ctx = NormContext(device_batch=2) if name == "syncbn" else NormContext(norm_batch=1, device_batch=2)
        recipe = build_norm(name, ctx)
        norm = layers.get_norm(recipe.ctor, 16)
        assert type(norm) is type(recipe.ctor(16))
    conv = layers.Conv2d(3, 16, 3, bias=False, norm=layers.get_norm(build_norm("mabn").ctor, 16))
    assert isinstance(conv.norm, MABN2d) and conv(torch.randn(2, 3, 8, 8)).shape == (2, 16, 6, 6)


def _gpu_context(name: str) -> NormContext:
    """Normalization batch 2 in device batch 16; syncbn normalizes the whole device batch (one process)."""
    return NormContext(norm_batch=16, device_batch=16) if name == "syncbn" else NormContext(norm_batch=2,
                                                                                             device_batch=16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", registered_norms())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_no_sync_and_autocast_matches_cpu(name, dtype):
    """On CUDA, channels_last: forward+backward raise on any host-device sync; grouped autocast results track
    float32 CPU (every registered norm; one that computes in float32 under autocast may return float32)."""
    cpu = build_norm(name, _gpu_context(name)).ctor(32).train()
    gpu = build_norm(name, _gpu_context(name)).ctor(32).cuda().train()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(16, 32, 8, 8).to(dtype).float()  # values representable in the low-precision dtype
    dy = torch.randn_like(x).to(dtype).float()
    xc = x.clone().requires_grad_(True)
    cpu(xc).backward(dy)
    xg = x.to(dtype).cuda().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dyg = dy.to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=dtype):
            y = gpu(xg)
        y.backward(dyg.to(y.dtype))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.dtype in (dtype, torch.float32) and xg.grad.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(xg.grad.float().cpu(), xc.grad, rtol=tol, atol=tol)
    for key, value in cpu.state_dict().items():  # statistics are float32 on both sides
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-5)
