"""Several FSDP2 models in one process (a training and an evaluation model, a rebuild after a
failure, the tests' launcher runs): each one's parameters carry the DeviceMesh it was sharded
over, 2 gloo processes.

torch's DTensor sharding-propagation cache is keyed by DeviceMesh *equality*, which compares
rank layouts, not process groups: fully_shard's `nn.Parameter(dtensor)` (an aten.detach) of a
shape an earlier model had got that model's mesh back, with its process group. Measured
before the fix (torch 2.13): the second model's (8, 4) weight and (8,) bias named the first
model's mesh, its new (6, 8) and (6,) parameters its own. wrap_torch_fsdp2 clears the cache
before sharding and then checks every parameter's mesh (test_a_stale_mesh_is_refused shows the
check catches it when the cache is not cleared).
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from lasp2_testing.dist import run_distributed_for_result  # noqa: E402


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)


def _model(shapes):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(inputs, outputs) for outputs, inputs in shapes])


def _wrap_three_models(rank, world):
    """Three models wrapped in a row, each over a new group of all ranks (equal meshes, other
    groups), each repeating the shapes before it and adding one; the third with the cache
    clearing disabled. Per model and parameter: is its mesh's group the one that model was
    wrapped over (or wrap_torch_fsdp2's refusal)."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from megatron_patches import torch_fsdp
    from megatron_patches.cpu import enable_cpu_execution

    enable_cpu_execution()
    out = {}
    for name, shapes in {"first": [(8, 4)], "second": [(8, 4), (6, 8)],
                         "third, cache kept": [(8, 4), (6, 8), (2, 6)]}.items():
        if name == "third, cache kept":
            torch_fsdp._forget_cached_meshes = lambda: None
        group = dist.new_group(list(range(world)))
        try:
            wrapped = torch_fsdp.wrap_torch_fsdp2(_config(), _model(shapes), process_group=group)
        except SystemExit as error:
            out[name] = str(error)
            continue
        out[name] = {key: param.device_mesh.get_group() is group for key, param in wrapped.module.named_parameters()}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed_for_result(2, _wrap_three_models, timeout=120)


def test_every_model_gets_its_own_mesh(results):
    assert results["first"] == {"0.weight": True, "0.bias": True}
    assert results["second"] == {"0.weight": True, "0.bias": True, "1.weight": True, "1.bias": True}


def test_a_stale_mesh_is_refused(results):
    """Without clearing the cache the third model's repeated shapes come out with the second
    model's mesh: wrap_torch_fsdp2 stops, naming the parameter, instead of training on it."""
    assert "0.weight came out of fully_shard with another model's DeviceMesh" in results["third, cache kept"], \
        results["third, cache kept"]
