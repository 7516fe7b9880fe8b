"""megatron-core's own GatedDeltaNet under LASP-2 context parallelism (Lasp2CoreGatedDeltaNet).

The independent reference is megatron-core's GatedDeltaNet itself, on one process and the whole
sequence, in its config.deterministic_mode path (its pure-torch torch_chunk_gated_delta_rule
and nn.Conv1d). Building it on a CPU needs three stand-ins, set in the test processes only:
torch.cuda.current_device -> "cpu" (megatron_patches.cpu), HAVE_FLA -> True and fla's l2norm
-> the same formula in torch (x / sqrt(sum x^2 + 1e-6)); its torch.compile'd gated norm runs
eagerly (no compiler needed). It has no packed sequences, so
packed batches are compared with its runs on each document alone.

Ours loads its state_dict unchanged and runs over CP = 2 (both splits, every provider,
selective recompute), CP = 3, and TP = 2 x CP = 2 (megatron-core's TP = 1 distributed
checkpoint loaded; with Megatron's sequence parallelism too). float64 parameters and inputs: ours is float64 throughout,
the reference's delta rule casts to float32, so outputs and gradients agree to float32
rounding (measured ~1e-7 relative; bound TOL). A wrong halo or state exchange gives errors
of order 1e-1 (checked below by switching each off).
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from megatron_testing import worker_setup  # noqa: E402

HIDDEN, SEQ, BATCH = 32, 24, 2
KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, WIDTH = 2, 4, 8, 6, 4
PACKED_CU = (0, 5, 14, 16, 24)  # documents inside a part, across parts and ranks, one shorter than the halo
TOL = 1e-5  # max |diff| / max |ref|: float32 rounding of the reference's delta rule
# A = exp(A_log) from here, not megatron-core's default (1, 16): with A >= 1 the state keeps
# under exp(-1.3) per token and a rank's incoming state hardly reaches its outputs (a broken
# state exchange then changed them by ~1e-3 only); ~0.1 keeps it over the whole sequence
A_INIT_RANGE = (0.02, 0.2)


def _fla_l2norm(x, dim=-1, eps=1e-6, **_):
    return x * torch.rsqrt((x * x).sum(dim, keepdim=True) + eps)


def _use_megatron_gdn_on_cpu():
    """megatron-core's GatedDeltaNet buildable and runnable here (see the module docstring):
    its __init__ and forward read HAVE_FLA / l2norm from their modules' globals (one module in
    0.16.1, two in later releases)."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    torch._dynamo.config.disable = True  # its gated norm is torch.compile'd: eager is the reference
    for fn in (GatedDeltaNet.__init__, GatedDeltaNet.forward):
        fn.__globals__["HAVE_FLA"] = True
        fn.__globals__["l2norm"] = _fla_l2norm


def _config(tp=1, cp=1, **overrides):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
                  params_dtype=torch.float64, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
                  activation_func=F.silu, deterministic_mode=True, linear_conv_kernel_dim=WIDTH,
                  linear_key_head_dim=KEY_DIM, linear_value_head_dim=VALUE_DIM, linear_num_key_heads=KEY_HEADS,
                  linear_num_value_heads=VALUE_HEADS, tensor_model_parallel_size=tp, context_parallel_size=cp)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _submodules(out_norm=None):
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=out_norm or LNImpl,
                                   out_proj=RowParallelLinear)


def _pgs():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])


def _theirs(seed=5, **config):
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    torch.manual_seed(seed)
    return GatedDeltaNet(_config(**config), _submodules(), layer_number=1, conv_bias=True,
                         A_init_range=A_INIT_RANGE, pg_collection=_pgs())


def _ours(options, seed=11, tp=1, cp=1, out_norm=None, **config):
    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet

    torch.manual_seed(seed)
    return Lasp2CoreGatedDeltaNet(_config(tp, cp, **config), _submodules(out_norm), layer_number=1, conv_bias=True,
                                  A_init_range=A_INIT_RANGE, pg_collection=_pgs(), lasp2_options=options)


def _inputs(packed):
    gen = torch.Generator().manual_seed(3)
    b = 1 if packed else BATCH
    x = torch.randn(SEQ, b, HIDDEN, generator=gen, dtype=torch.float64)
    w = torch.randn(SEQ, b, HIDDEN, generator=gen, dtype=torch.float64)  # loss weights
    return x, w


def _reference(module, packed):
    """Output, input gradient and parameter gradients of sum(out * w) on one process; packed:
    each document run alone (megatron-core's layer has no packed sequences)."""
    x, w = _inputs(packed)
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if packed:
        out = torch.cat([module(x[a:b], None)[0] for a, b in zip(PACKED_CU[:-1], PACKED_CU[1:])])
    else:
        out = module(x, None)[0]
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _run_ours(module, split, packed, cp_group, sp_group=None):
    """This rank's output and input gradient, and the CP-summed parameter gradients. sp_group:
    Megatron's sequence parallelism, the rank's tokens split again over the TP group (and the
    gradients of parameters marked sequence_parallel summed over it, as Megatron does)."""
    import torch.distributed as dist

    from lasp2.distributed.sequence_split import global_token_index
    from megatron_patches.batch import get_packed_batch_on_this_sp_rank

    x, w = _inputs(packed)
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    idx = global_token_index(SEQ // cp, rank, cp, split)
    if sp_group is not None:
        idx = idx.chunk(dist.get_world_size(sp_group))[dist.get_rank(sp_group)]
    params = None
    if packed:
        cu = torch.tensor(PACKED_CU, dtype=torch.int32)
        params = get_packed_batch_on_this_sp_rank({"tokens": torch.zeros(1, SEQ)}, cu, split=split,
                                                  cp_group=cp_group)[1]
    xl = x[idx].clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out, bias = module(xl, None, packed_seq_params=params)
    assert bias is None
    (out * w[idx]).sum().backward()
    grads = {}
    for n, p in module.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=cp_group)  # Megatron reduces replicated parameters over dp x cp
        if sp_group is not None and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=sp_group)
        grads[n] = g
    return idx, out.detach(), xl.grad, grads


def _rel(got, ref, full=None):
    """max |got - ref| / max |full| (full: the whole reference, of which ref may be a TP share)."""
    full = ref if full is None else full
    return ((got - ref).abs().max() / full.abs().max().clamp_min(1e-30)).item()


def _errors(ref, got, tp_slice=lambda name, t: t):
    """Worst relative error of output, input gradient and each parameter gradient."""
    out_ref, dx_ref, grads_ref = ref
    idx, out, dx, grads = got
    errs = {"out": _rel(out, out_ref[idx]), "dx": _rel(dx, dx_ref[idx])}
    assert set(grads) == set(grads_ref), sorted(set(grads) ^ set(grads_ref))
    for name, g in grads.items():
        errs[name] = _rel(g, tp_slice(name, grads_ref[name]), grads_ref[name])
    return errs


def _cp_worker(rank, world):
    """CP = world over every rank; on world 2 also the bad-config errors and the checks that
    the comparison fails without the halo or the state exchange."""
    from megatron.core import parallel_state as ps

    from lasp2.ops import _group_consistency as GC
    from megatron_patches import Lasp2Options
    from megatron_patches import core_gdn
    from megatron_testing import init_parallel

    worker_setup()
    _use_megatron_gdn_on_cpu()
    init_parallel(tp=1, cp=1)
    theirs = _theirs()
    refs = {packed: _reference(theirs, packed) for packed in (False, True)}
    state = theirs.state_dict()
    same_seed = _same_seed_state(state)
    init_parallel(tp=1, cp=world)
    cp_group = ps.get_context_parallel_group()
    providers = ("lasp2", "lasp1", "ulysses") if VALUE_HEADS % world == 0 else ("lasp2", "lasp1")
    results, checks = {}, {}  # checks: cross-rank checks (exchanges) of one forward and backward
    for provider in providers:
        for split in ("balanced", "contiguous"):
            ours = _ours(Lasp2Options(provider=provider, split=split, layer_pattern="G"), cp=world)
            ours.load_state_dict(state)  # strict: the same names and shapes
            for packed in (False, True):
                key = f"cp{world} {provider} {split}{' packed' if packed else ''}"
                before = GC.STATS["sync"]
                results[key] = _errors(refs[packed], _run_ours(ours, split, packed, cp_group))
                checks[key] = GC.STATS["sync"] - before
    # selective recompute of the delta rule ("core_attn"): the same numbers
    ours = _ours(Lasp2Options(layer_pattern="G"), cp=world, recompute_granularity="selective",
                 recompute_modules=["core_attn"])
    ours.load_state_dict(state)
    assert ours.checkpoint_core_attention
    for packed in (False, True):
        key = f"cp{world} recompute{' packed' if packed else ''}"
        before = GC.STATS["sync"]
        results[key] = _errors(refs[packed], _run_ours(ours, "balanced", packed, cp_group))
        checks[key] = GC.STATS["sync"] - before
    out = {"results": results, "checks": checks}
    if world == 2:
        out["same_seed_state"] = same_seed
        out["broken"] = _broken(core_gdn, state, refs, cp_group)
        out["errors"] = _bad_configs()
        out["disagreements"] = _disagreements(rank, state, cp_group)
    return out


def _same_seed_state(state):
    """ours built with the seeds theirs had (torch's, and the RNG tracker's, reset): the same
    weights (megatron-core's draws, in order)."""
    from megatron_patches import Lasp2Options
    from megatron_testing import init_parallel

    init_parallel(tp=1, cp=1)
    ours = _ours(Lasp2Options(), seed=5)
    mine = ours.state_dict()
    diffs = {k: (mine[k] - state[k]).abs().max().item() for k in state if isinstance(state[k], torch.Tensor)}
    return {"keys": list(mine) == list(state), "max_diff": max(diffs.values()), "diffs": diffs}


def _broken(core_gdn, state, refs, cp_group):
    """The comparison's errors with the convolution halo or the delta rule's state exchange
    off (each rank alone, documents still reset): both must exceed TOL by far."""
    from megatron_patches import Lasp2Options

    out = {}
    real_conv, real_rule = core_gdn.causal_conv_sp, core_gdn.lasp2.gated_delta_rule

    def conv_alone(x, weight, bias, group=None, split=None, cu_seqlens=None, ranks_checked=False):
        return real_conv(x, weight, bias, group=None, split="contiguous", cu_seqlens=None)

    def rule_alone(*args, group=None, split=None, cu_seqlens=None, **kwargs):
        return real_rule(*args, group=None, cu_seqlens=None, **kwargs)

    for what in ("halo", "state"):
        ours = _ours(Lasp2Options(split="balanced"), cp=2)
        ours.load_state_dict(state)
        try:
            if what == "halo":
                core_gdn.causal_conv_sp = conv_alone
            else:
                core_gdn.lasp2.gated_delta_rule = rule_alone
            out[what] = _errors(refs[False], _run_ours(ours, "balanced", False, cp_group))
        finally:
            core_gdn.causal_conv_sp, core_gdn.lasp2.gated_delta_rule = real_conv, real_rule
    return out


def _disagreements(rank, state, cp_group):
    """Each rank's error when rank 0 alone differs (CP = 2): every rank raises a ValueError
    at that call (the one check a call covers the halo and the delta rule), and the group
    works after. [rank 0's, rank 1's] message per case."""
    import torch.distributed as dist

    from megatron_patches import Lasp2Options

    bad = rank == 0

    def layer(provider="lasp2"):
        ours = _ours(Lasp2Options(provider=provider, split="balanced", layer_pattern="G"), cp=2)
        ours.load_state_dict(state)
        return ours

    x = _inputs(False)[0][: SEQ // 2]
    cases = {"provider": lambda: layer("lasp1" if bad else "lasp2")(x),
             "batch": lambda: layer()(x[:, :1] if bad else x),
             "NaN gates": lambda: layer()(x * float("nan") if bad else x)}
    out = {}
    for name, call in cases.items():
        try:
            call()
            mine = "no error"
        except ValueError as exc:
            mine = str(exc)
        layer()(x)  # in step again
        seen = [None, None]
        dist.all_gather_object(seen, mine, group=cp_group)
        out[name] = seen
    return out


def _bad_configs():
    """Lasp2ConfigError messages of configs that cannot work (CP = 2)."""
    from megatron_patches import Lasp2ConfigError, Lasp2Options

    cases = {
        "provider none": lambda: _ours(Lasp2Options(provider="none", layer_pattern="S"), cp=2),
        "ulysses heads": lambda: _ours(Lasp2Options(provider="ulysses", split="contiguous", layer_pattern="G"),
                                       cp=2, linear_num_key_heads=1, linear_num_value_heads=3),
        "gqa": lambda: _ours(Lasp2Options(), cp=2, linear_num_key_heads=3, linear_num_value_heads=4),
        "no width": lambda: _ours(Lasp2Options(), cp=2, linear_conv_kernel_dim=None),
    }
    out = {}
    for name, build in cases.items():
        try:
            build()
            out[name] = None
        except Lasp2ConfigError as exc:
            out[name] = str(exc)
    return out


def _tp_shard(name, full, tp, rank):
    """This TP rank's share of a full (TP = 1) parameter or gradient, as megatron-core lays it
    out: in_proj / conv1d per section (each section column-parallel), A_log / dt_bias by head,
    out_proj row-parallel, out_norm replicated."""
    qk, v, hv = KEY_HEADS * KEY_DIM, VALUE_HEADS * VALUE_DIM, VALUE_HEADS
    sections = {"in_proj.weight": [qk, qk, v, v, hv, hv], "conv1d.weight": [qk, qk, v], "conv1d.bias": [qk, qk, v],
                "A_log": [hv], "dt_bias": [hv]}
    if name == "out_proj.weight":
        return full.chunk(tp, dim=1)[rank]
    if name not in sections:
        return full
    return torch.cat([part.chunk(tp)[rank] for part in full.split(sections[name])])


class _SequenceParallelRMSNorm:
    """out_norm for Megatron's sequence parallelism (the local spec's torch norm refuses it):
    RMSNorm whose weight is marked sequence_parallel, as Transformer Engine's norm is."""

    def __new__(cls, config, hidden_size, eps):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def _sharded_view(module):
    """(key, global shape, global offset, replica id, local shape) of every tensor of a module's
    sharded_state_dict, its factories (in_proj / conv1d section splits) applied."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = module.sharded_state_dict(prefix="layer.")
    apply_factories(sharded)
    rows = []
    for value in sharded.values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, ShardedTensor):
                rows.append((t.key, tuple(t.global_shape), tuple(t.global_offset), tuple(t.replica_id),
                             tuple(t.local_shape)))
    return sorted(rows)


def _tp_cp_worker(rank, world, ckpt_dir):
    """TP = 2 x CP = 2: megatron-core's TP = 1 distributed checkpoint loads into ours, which then
    equals megatron-core on one process; ours' sharded_state_dict is theirs at TP 2 x CP 2."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_patches import Lasp2ConfigError, Lasp2Options
    from megatron_testing import init_parallel

    worker_setup()
    _use_megatron_gdn_on_cpu()
    init_parallel(tp=1, cp=1)
    theirs = _theirs()
    refs = {packed: _reference(theirs, packed) for packed in (False, True)}
    full = {k: v for k, v in theirs.state_dict().items() if isinstance(v, torch.Tensor)}
    dist_checkpointing.save(theirs.sharded_state_dict(prefix="layer."), ckpt_dir)
    init_parallel(tp=2, cp=2)
    tp_rank, cp_group = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_group()
    out = {"sharded_view_equal": _sharded_view(_theirs(tp=2, cp=2)) == _sharded_view(
        _ours(Lasp2Options(layer_pattern="G"), tp=2, cp=2))}
    shard = lambda name, t: _tp_shard(name, t, 2, tp_rank)  # noqa: E731
    for split in ("balanced", "contiguous"):
        ours = _ours(Lasp2Options(split=split, layer_pattern="G"), tp=2, cp=2)
        loaded = dist_checkpointing.load(ours.sharded_state_dict(prefix="layer."), ckpt_dir)
        ours.load_state_dict({k[len("layer."):]: v for k, v in loaded.items()})
        mine = ours.state_dict()
        out[f"{split} load_diff"] = max((mine[k] - shard(k, v)).abs().max().item() for k, v in full.items())
        for packed in (False, True):
            key = f"tp2 cp2 {split}{' packed' if packed else ''}"
            out[key] = _errors(refs[packed], _run_ours(ours, split, packed, cp_group), shard)
    # Megatron's sequence parallelism: in_proj gathers the TP group's tokens, out_proj scatters them
    ours = _ours(Lasp2Options(layer_pattern="G"), tp=2, cp=2, out_norm=_SequenceParallelRMSNorm,
                 sequence_parallel=True)
    ours.load_state_dict({k: shard(k, v) for k, v in full.items()})
    for packed in (False, True):
        key = f"tp2 cp2 sequence-parallel{' packed' if packed else ''}"
        out[key] = _errors(refs[packed], _run_ours(ours, "balanced", packed, cp_group,
                                                   ps.get_tensor_model_parallel_group()), shard)
    try:  # one key head cannot be split over 2 TP ranks
        _ours(Lasp2Options(layer_pattern="G"), tp=2, cp=2, linear_num_key_heads=1, linear_num_value_heads=2)
        out["tp error"] = None
    except Lasp2ConfigError as exc:
        out["tp error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def cp2():
    return run_distributed_for_result(2, _cp_worker, timeout=300)


def test_cp2_equals_megatron_core_gdn_on_one_process(cp2):
    results = cp2["results"]
    assert len(results) == 3 * 2 * 2 + 2  # providers x splits x (unpacked, packed), recompute
    for key, errs in results.items():
        assert max(errs.values()) <= TOL, (key, errs)


def test_one_cross_rank_check_per_call(cp2):
    """The convolution's halo and the delta rule share ONE check a call (the op is told:
    ranks_checked), also when selective recompute runs the delta rule again in backward;
    there were two (three with recompute)."""
    checks = cp2["checks"]
    assert len(checks) == len(cp2["results"]) and set(checks.values()) == {1}, checks


def test_same_seed_gives_megatron_cores_weights(cp2):
    r = cp2["same_seed_state"]
    assert r["keys"] and r["max_diff"] == 0.0, r


def test_the_comparison_catches_a_missing_halo_or_state_exchange(cp2):
    for what, errs in cp2["broken"].items():
        assert errs["out"] > 1e3 * TOL, (what, errs)


def test_bad_configs_raise_naming_the_setting(cp2):
    errors = cp2["errors"]
    assert "--sp-provider" in errors["provider none"]
    assert "--context-parallel-size" in errors["ulysses heads"]
    assert "linear_num_value_heads" in errors["gqa"] and "linear_num_key_heads" in errors["gqa"]
    assert "linear_conv_kernel_dim" in errors["no width"]


def test_ranks_that_disagree_all_raise(cp2):
    d = cp2["disagreements"]
    assert all("disagree on provider (lasp2/lasp1/ulysses): [1, 0]" in m for m in d["provider"]), d
    assert all("disagree on batch size: [1, 2]" in m for m in d["batch"]), d
    assert "`g` contains NaN" in d["NaN gates"][0] and "rejected their arguments" in d["NaN gates"][1], d


def test_cp3_equals_megatron_core_gdn_on_one_process():
    results = run_distributed_for_result(3, _cp_worker, timeout=300)["results"]
    # lasp2, lasp1 (4 value heads do not split over 3) x splits x packing, recompute
    assert len(results) == 2 * 2 * 2 + 2
    for key, errs in results.items():
        assert max(errs.values()) <= TOL, (key, errs)


def test_tp2_cp2_loads_megatron_core_checkpoint_and_equals_one_process(tmp_path):
    r = run_distributed_for_result(4, _tp_cp_worker, str(tmp_path), timeout=300)  # the checkpoint's folder
    assert r.pop("sharded_view_equal")
    error = r.pop("tp error")
    assert ("linear_num_key_heads (--linear-num-key-heads) = 1 must be divisible by "
            "tensor_model_parallel_size (--tensor-model-parallel-size) = 2") in error, error
    for split in ("balanced", "contiguous"):
        assert r.pop(f"{split} load_diff") == 0.0
    assert len(r) == 6  # splits x packing, sequence parallelism x packing
    for key, errs in r.items():
        assert max(errs.values()) <= TOL, (key, errs)


class _LocalBackend:
    """The builders megatron-core's get_gated_delta_net_module_spec asks its backend for
    (Transformer Engine's in Megatron; local layers here)."""

    def column_parallel_layer_norm_linear(self):
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return ColumnParallelLinear

    def layer_norm(self, rms_norm=False, for_qk=False):
        from megatron.core.models.gpt.gpt_layer_specs import LNImpl

        return LNImpl

    def row_parallel_linear(self):
        from megatron.core.tensor_parallel import RowParallelLinear

        return RowParallelLinear


def _hybrid_block_spec():
    """Two layers as megatron-core's experimental block spec lays them out: GatedDeltaNet, then
    softmax attention."""
    from types import SimpleNamespace

    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_gated_delta_net_module_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    gdn = get_gated_delta_net_module_spec(SimpleNamespace(normalization="RMSNorm"), backend=_LocalBackend())
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(self_attention=gdn))
    return TransformerBlockSubmodules(layer_specs=[layer, get_gpt_layer_local_spec()])


def test_spec_rewrite_swaps_megatron_core_gdn_only():
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    from megatron_patches import Lasp2Options
    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet
    from megatron_patches.specs import use_lasp2_core_gdn

    block = _hybrid_block_spec()
    options = Lasp2Options(provider="lasp1", layer_pattern="G")
    ours = use_lasp2_core_gdn(block, options)
    gdn, attention = (layer.submodules.self_attention for layer in ours.layer_specs)
    assert gdn.module is Lasp2CoreGatedDeltaNet and gdn.params["lasp2_options"] is options
    theirs = block.layer_specs[0].submodules.self_attention
    assert theirs.module is GatedDeltaNet  # the input spec is left as it was
    assert gdn.submodules == theirs.submodules and gdn.metainfo == theirs.metainfo
    assert attention.module is block.layer_specs[1].submodules.self_attention.module
    # a layer list and a lone module spec are rewritten too; options None: read when built
    assert use_lasp2_core_gdn([theirs])[0].params == {"lasp2_options": None}


def test_spec_rewrite_errors():
    from megatron_patches import Lasp2ConfigError, Lasp2Options
    from megatron_patches.specs import get_lasp2_core_gdn_block_spec, use_lasp2_core_gdn

    block = _hybrid_block_spec()
    with pytest.raises(Lasp2ConfigError, match="--sp-provider 'none'"):
        use_lasp2_core_gdn(block, Lasp2Options(provider="none", layer_pattern="S"))
    with pytest.raises(Lasp2ConfigError, match="no megatron-core GatedDeltaNet"):
        use_lasp2_core_gdn(block.layer_specs[1:])
    with pytest.raises(Lasp2ConfigError, match="experimental_attention_variant"):
        get_lasp2_core_gdn_block_spec(_config())


def test_megatron_lm_wrapper_keeps_megatrons_spec_and_swaps_its_gdn(monkeypatch):
    from types import SimpleNamespace

    from megatron.core.models.gpt import experimental_attention_variant_module_specs as variants

    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet
    from megatron_patches.run import install_core_gdn, spec_args, uses_core_gdn

    argv = ["--sp-provider", "lasp2", "--experimental-attention-variant", "gated_delta_net",
            "--linear-attention-freq", "4"]
    assert uses_core_gdn(argv) and spec_args(argv) == argv  # no --spec: Megatron-LM builds its block spec
    assert not uses_core_gdn(["--sp-provider", "none", "--experimental-attention-variant", "gated_delta_net"])
    assert spec_args(["--sp-provider", "lasp2"])[-1] == "lasp2_layer_spec"
    # that block spec's softmax layers are Megatron's own attention (zig-zag under CP only): a
    # contiguous split would feed one of the two layer kinds the wrong tokens (session 22)
    with pytest.raises(SystemExit, match="--sp-split contiguous with --experimental-attention-variant"):
        spec_args(argv + ["--sp-split", "contiguous"])
    assert spec_args(argv + ["--sp-split", "balanced"]) == argv + ["--sp-split", "balanced"]
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(variants, "get_gated_delta_net_module_spec", variants.get_gated_delta_net_module_spec)
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    # install_core_gdn patches these three process-wide: put them back after this test
    monkeypatch.setattr(TransformerConfig, "__post_init__", TransformerConfig.__post_init__)
    monkeypatch.setattr(GatedDeltaNet, "__init__", GatedDeltaNet.__init__)
    gdn_cp4 = dict(experimental_attention_variant="gated_delta_net", linear_attention_freq=4, num_layers=4, cp=4)
    with pytest.raises(AssertionError, match="context_parallel_size"):  # megatron-core's own check
        _config(**gdn_cp4)
    install_core_gdn()
    install_core_gdn()  # idempotent
    spec = variants.get_gated_delta_net_module_spec(SimpleNamespace(normalization="RMSNorm"), backend=_LocalBackend())
    assert spec.module is Lasp2CoreGatedDeltaNet and spec.params == {"lasp2_options": None}
    # the config Megatron-LM builds from --experimental-attention-variant ... --context-parallel-size 4
    config = _config(**gdn_cp4)
    assert (config.experimental_attention_variant, config.context_parallel_size) == ("gated_delta_net", 4)
