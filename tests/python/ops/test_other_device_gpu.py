"""Tensors on a GPU other than the current one (marker gpu, needs 2 GPUs): the ops run
their kernels, streams and scratch on the inputs' device, so the result equals the same
call on the current device (before the binding's device guards, the launches went to
the current device's stream).

Run on the device machine: `pytest -m gpu tests/python/ops/test_other_device_gpu.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def inputs(kind, T=512, H=4, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    q, k, v = rnd(1, T, H, D), F.normalize(rnd(1, T, H, D), dim=-1), rnd(1, T, H, D)
    if kind == "linear":
        return q, k, v, F.logsigmoid(rnd(1, T, H) + 3.0)
    return q, k, v, F.logsigmoid(rnd(1, T, H) + 3.0), torch.sigmoid(rnd(1, T, H))


def fwd_bwd(kind, xs, device):
    leaves = [x.to(device, torch.bfloat16 if i < 3 else torch.float32).requires_grad_()
              for i, x in enumerate(xs)]
    if kind == "linear":
        o = lasp2.linear_attention(*leaves[:3], g=leaves[3])
    else:
        o, _ = lasp2.gated_delta_rule(*leaves)
    o.float().square().sum().backward()
    return [o.detach().float().cpu()] + [x.grad.float().cpu() for x in leaves]


@pytest.mark.parametrize("kind", ["linear", "gdn"])
def test_inputs_on_another_gpu_equal_the_current_one(kind):
    xs = inputs(kind)
    torch.cuda.set_device(0)
    on_current = fwd_bwd(kind, xs, "cuda:0")
    on_other = fwd_bwd(kind, xs, "cuda:1")
    torch.cuda.synchronize(1)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], on_current, on_other):
        assert rel_err(b, a) < 1e-3, name
