"""torch.library's opcheck (schema, fake kernel against the real one, AOT dispatch with
its backward) for the LASP-1 provider's custom op on one device (the ring without
peers; the op over a group: tests/python/distributed/test_compile_group_providers.py,
which also opchecks the Ulysses and LASP-2H ops, whose collectives need a group), and
the closed form LASP-2H's fake kernel sizes its gathered keys with (symbolic lengths)."""

import pytest
import torch
import torch.nn.functional as F

from lasp2.ops import _lasp2h as H
from lasp2.ops._softmax_library import _fake_key_end
from lasp2.ops.providers import lasp1

UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("states", [False, True], ids=["rows", "with-states"])
def test_opcheck_lasp1_forward(states):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = F.logsigmoid(torch.randn(2, 10, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    h0 = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True) if states else None
    args = (q, k, v, g, None, None, h0, 0.5, 4, 0, 1, [], 2, states)
    torch.library.opcheck(lasp1.lasp1_forward, args, test_utils=UTILS)


def test_fake_key_end_equals_the_plans():
    for world in (2, 3, 4):
        for parts in (1, 2):
            for t in (2, 4, 6, 10):
                for rank in range(world):
                    for causal in (True, False):
                        want = H.key_end(H.plan_blocks(t, rank, world, parts, causal, None))
                        assert _fake_key_end(t, rank, world, parts, causal, None) == want, (world, parts, t, rank)
