"""One sequence-parallel context per batch: who holds which tokens, and what follows.

Every lasp2 op (and every RoPE helper) needs the same few facts about the batch it
runs on: the SP group with this rank's place in it, how the sequence is split over
the group (the parts each rank holds), the packed documents (cu_seqlens), and what
those give per local token: its global index, its RoPE position (restarting at each
document) and whether it starts a document. `build_sp_context` computes them once,
validated, and every op takes the result as ``sp_context=`` (as fla's
``build_cp_context`` / ``cp_context=``):

    ctx = lasp2.build_sp_context(group, split="balanced", cu_seqlens=cu, seqlen=T, device=x.device)
    y = model(x_local, sp_context=ctx)   # each layer: lasp2.linear_attention(..., sp_context=ctx)

Ops still accept ``group=`` / ``split=`` / ``cu_seqlens=`` and build a context per
call from them. The context is also where a caller swaps the communication for
measurement or tests: ``communicator=`` (the C++ core's, e.g. a timed or no-op one)
and ``collectives=`` (the torch.distributed calls of the Python-side algorithms).

The split layouts ("contiguous", "balanced") are documented in
lasp2/distributed/sequence_split.py; this module is the one Python home of the part
layout (csrc/core/include/lasp2/part_layout.h is the C++ one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import TORCH_COLLECTIVES, Collectives
from lasp2.distributed.communicator import check_group, get_communicator, group_rank_and_size
from lasp2.distributed.sequence_split import global_token_index, local_parts
from lasp2.options import SPLITS, check_choice

BUILD = "lasp2.build_sp_context"


def check_cu_seqlens_form(owner: str, cu_seqlens) -> int:
    """What can be checked of cu_seqlens without reading its values (type, dtype, shape;
    so a traced graph keeps it); returns the number of documents."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{owner}: `cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{owner}: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{owner}: `cu_seqlens` must be 1-D with at least 2 entries, "
                         f"got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device.type not in ("cpu", "cuda"):  # e.g. meta: its values cannot be read
        raise ValueError(f"{owner}: `cu_seqlens` is on {cu_seqlens.device}; it must be on the CPU or a CUDA device")
    return cu_seqlens.numel() - 1


def check_cu_seqlens(owner: str, cu_seqlens, global_len: Optional[int]) -> torch.Tensor:
    """Validates global cu_seqlens (documents of a packed sequence), ending at
    `global_len` unless that is None, and returns them as an int64 CPU tensor."""
    check_cu_seqlens_form(owner, cu_seqlens)
    # a copy: the context keeps it, and a caller's buffer refilled in place must not change it
    values = cu_seqlens.detach().to("cpu", torch.int64, copy=True)
    if values[0].item() != 0:
        raise ValueError(f"{owner}: `cu_seqlens` must start at 0, got {values[0].item()}")
    if bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"{owner}: `cu_seqlens` must be non-decreasing, got {values.tolist()}")
    if global_len is not None and values[-1].item() != global_len:
        raise ValueError(
            f"{owner}: `cu_seqlens` must end at the global sequence length {global_len} "
            f"(local length x group size), got {values[-1].item()}")
    return values


def document_starts(values: torch.Tensor, seqlen: int) -> torch.Tensor:
    """uint8 [seqlen] (CPU): 1 at each inner boundary of the checked global cu_seqlens
    `values` (check_cu_seqlens). The one computation of the document starts the kernels
    take, whether an SPContext or an op's custom op plans them (so both give the same
    bits); an empty last document's boundary (= seqlen) falls off the end."""
    starts = torch.zeros(seqlen + 1, dtype=torch.uint8)
    starts[values[1:-1]] = 1
    return starts[:seqlen]


def check_packed_batch(owner: str, batch: int):
    """Documents of a packed sequence (cu_seqlens) need batch size 1."""
    if batch != 1:
        raise ValueError(f"{owner}: `cu_seqlens` needs packed input with batch size 1, got batch {batch}")


def per_call_documents(owner: str, sp_context, group, cu_seqlens, batch: int) -> Optional[int]:
    """The number of documents of a per-call `cu_seqlens` on one device (no `group`, no
    `sp_context`), checked in form only: the op passes the tensor into its custom op,
    which reads and checks the values (ValueError naming `cu_seqlens`) and plans the
    documents there, so a torch.compile(fullgraph=True) graph takes per-call documents
    without a break. None when the documents, if any, go through an SPContext
    (resolve_sp_context reads them in Python)."""
    if sp_context is not None or group is not None or cu_seqlens is None:
        return None
    num_docs = check_cu_seqlens_form(owner, cu_seqlens)
    check_packed_batch(owner, batch)
    return num_docs


class _memo:
    """functools.cached_property without its lock (Python 3.11 takes an RLock on every
    first access, a context manager torch.compile cannot trace): a context built outside
    a compiled function and used inside it computes its per-token tensors in the graph.
    The value lands in the instance's __dict__, which then shadows this descriptor."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = self.fn(obj)
        obj.__dict__[self.name] = value
        return value


@dataclass(frozen=True, eq=False)
class SPContext:
    """The sequence-parallel facts of one batch (build it with `build_sp_context`).

    group, rank, world_size: the SP group (None: one device, rank 0 of 1).
    split: the requested layout; `parts_per_rank` is 1 for "contiguous" (and on one
        device, where both layouts are the plain order) and 2 for "balanced".
    seqlen, local_len: global and per-rank sequence lengths.
    cu_seqlens: the global document boundaries (int64, CPU) or None.
    device: where the cached per-token tensors live.
    communicator, collectives: the communication used by the ops (see module doc).
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int
    split: str
    seqlen: int
    cu_seqlens: Optional[torch.Tensor]
    device: torch.device
    communicator: Any = None
    collectives: Collectives = TORCH_COLLECTIVES

    @property
    def local_len(self) -> int:
        return self.seqlen // self.world_size

    @property
    def parts_per_rank(self) -> int:
        return 2 if self.split == "balanced" and self.world_size > 1 else 1

    @property
    def effective_split(self) -> str:
        """The split actually in effect: "contiguous" on one device."""
        return "balanced" if self.parts_per_rank == 2 else "contiguous"

    @_memo
    def parts(self) -> List[Tuple[int, int, int]]:
        """(local start, length, global start) of each part this rank holds."""
        return local_parts(self.local_len, self.rank, self.world_size, self.parts_per_rank)

    @_memo
    def global_index(self) -> torch.Tensor:
        """int64 [local_len]: the global position of each local token."""
        return global_token_index(self.local_len, self.rank, self.world_size, self.effective_split,
                                  device=self.device)

    @_memo
    def positions(self) -> torch.Tensor:
        """int64 [local_len]: RoPE positions, the global position or, with cu_seqlens,
        the position within the token's document."""
        if self.cu_seqlens is None:
            return self.global_index
        pos = self.global_index.cpu()
        doc = torch.searchsorted(self.cu_seqlens, pos, right=True) - 1
        return (pos - self.cu_seqlens[doc.clamp(0, self.cu_seqlens.numel() - 1)]).to(self.device)

    @_memo
    def cu_seqlens_list(self) -> Optional[List[int]]:
        return None if self.cu_seqlens is None else self.cu_seqlens.tolist()

    @_memo
    def doc_start(self) -> Optional[torch.Tensor]:
        """uint8 [local_len]: 1 where a local token begins a document (other than token 0);
        None without cu_seqlens."""
        starts = self.global_doc_start
        return None if starts is None else starts[self.global_index]

    def doc_start_on(self, device) -> Optional[torch.Tensor]:
        if self.cu_seqlens is None:
            return None
        starts = self.doc_start
        return None if starts is None else starts.to(device)

    @_memo
    def global_doc_start(self) -> Optional[torch.Tensor]:
        """uint8 [seqlen]: the document starts of the whole sequence (for algorithms that
        hold every token of some heads, such as Ulysses)."""
        if self.cu_seqlens is None:
            return None
        return document_starts(self.cu_seqlens, self.seqlen).to(self.device)

    def comm(self):
        """The C++ core's communicator for the group (None on one device)."""
        if self.communicator is not None:
            return self.communicator
        return get_communicator(self.group, self.device)


def _build(owner: str, group, split: str, cu_seqlens, seqlen: Optional[int], local_len: Optional[int],
           device, communicator=None, collectives: Optional[Collectives] = None) -> SPContext:
    check_group(owner, group)
    check_choice(owner, "split", split, SPLITS)
    rank, world = group_rank_and_size(group)
    parts = 2 if split == "balanced" and world > 1 else 1
    if local_len is not None:  # per-call arguments: the op knows its local length
        if local_len % parts:
            raise ValueError(f"{owner}: the balanced split needs an even local sequence length, got {local_len}")
        seqlen = local_len * world
    elif seqlen is None:
        if cu_seqlens is None:
            raise ValueError(f"{owner}: pass `seqlen` (the global sequence length) or `cu_seqlens`")
        seqlen = int(check_cu_seqlens(owner, cu_seqlens, None)[-1])
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"{owner}: `seqlen` must be a positive int, got {seqlen!r}")
    if seqlen % (world * parts):
        raise ValueError(f"{owner}: `seqlen` {seqlen} must divide into {world * parts} equal parts "
                         f"for the {split!r} split over {world} ranks")
    cu = None if cu_seqlens is None else check_cu_seqlens(owner, cu_seqlens, seqlen)
    return _with_boundaries(SPContext(group, rank, world, split, seqlen, cu, torch.device(device or "cpu"),
                                      communicator, collectives or TORCH_COLLECTIVES))


def _with_boundaries(ctx: SPContext) -> SPContext:
    """Reads cu_seqlens' values once, where the context is built: a compiled function
    that takes the context then sees python ints, not a tensor whose values it cannot
    trace (the ops' checks and the per-part document maps use them)."""
    ctx.cu_seqlens_list  # noqa: B018 - the memo is filled here, outside any compiled function
    return ctx


def build_sp_context(group: Optional[dist.ProcessGroup] = None, split: str = "contiguous",
                     cu_seqlens: Optional[torch.Tensor] = None, seqlen: Optional[int] = None,
                     device=None, *, communicator=None, collectives: Optional[Collectives] = None) -> SPContext:
    """The SP context of one batch, for every op and module that runs on it.

    Args:
        group: the sequence-parallel process group (None: one device). Used, never created.
        split: "contiguous" or "balanced" (lasp2.options.SPLITS).
        cu_seqlens: cumulative document lengths of the *global* packed sequence.
        seqlen: the global sequence length; defaults to ``cu_seqlens[-1]``.
        device: where the per-token tensors (positions, document starts) are kept.
        communicator: overrides the C++ core's communicator (benchmarks and tests use
            lasp2's timed and no-op communicators here).
        collectives: overrides the torch.distributed calls of Ulysses and LASP-2H
            (``lasp2.distributed.Collectives``).
    """
    return _build(BUILD, group, split, cu_seqlens, seqlen, None, device, communicator, collectives)


def layout_context(rank: int, world_size: int, split: str, seqlen: int, cu_seqlens: Optional[torch.Tensor] = None,
                   device=None) -> SPContext:
    """The layout facts of rank `rank` of `world_size` (parts, global index, RoPE positions,
    document starts) without a process group, for helpers that know the rank but hold no
    group (e.g. Megatron's RoPE slicing). Ops need a context with its group (build_sp_context)."""
    owner = "lasp2.layout_context"
    check_choice(owner, "split", split, SPLITS)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{owner}: `world_size` must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{owner}: `rank` must be an int in [0, {world_size}), got {rank!r}")
    parts = 2 if split == "balanced" and world_size > 1 else 1
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1 or seqlen % (world_size * parts):
        raise ValueError(f"{owner}: `seqlen` must be a positive int that divides into {world_size * parts} "
                         f"equal parts ({split!r} split over {world_size} ranks), got {seqlen!r}")
    cu = None if cu_seqlens is None else check_cu_seqlens(owner, cu_seqlens, seqlen)
    return _with_boundaries(SPContext(None, rank, world_size, split, seqlen, cu, torch.device(device or "cpu")))


def sp_context_for(group, split: str, cu_seqlens, local_len: int, device) -> SPContext:
    """The context of a module called on `local_len` tokens a rank (what a model builds
    once per batch; modules called without one build their own)."""
    return _build(BUILD, group, split, cu_seqlens, None, local_len, device)


_ONE_DEVICE: dict = {}  # (split, local length, device) -> the context of a call without group / cu_seqlens


def _one_device_context(owner: str, split: str, local_len: int, device) -> SPContext:
    """The (immutable) context of a one-device call without documents, built once per
    (split, length, device): building and validating it again is a measurable share of a
    small call. Arguments that fail the checks raise, and are not remembered."""
    key = (split, local_len, device)
    ctx = _ONE_DEVICE.get(key)
    if ctx is None:
        ctx = _build(owner, None, split, None, None, local_len, device)
        if len(_ONE_DEVICE) < 256:
            _ONE_DEVICE[key] = ctx
    return ctx


def resolve_sp_context(owner: str, sp_context: Optional[SPContext], group, split: str, cu_seqlens,
                       local_len: int, batch: int, device) -> SPContext:
    """The context an op runs with: `sp_context`, or one built from the per-call
    arguments. Raises ValueError naming the argument when they disagree."""
    if sp_context is None and group is None and cu_seqlens is None and type(split) is str:
        return _one_device_context(owner, split, local_len, device)
    if sp_context is None:
        ctx = _build(owner, group, split, cu_seqlens, None, local_len, device)
    else:
        if not isinstance(sp_context, SPContext):
            raise ValueError(f"{owner}: `sp_context` must be an SPContext from lasp2.build_sp_context, "
                             f"got {type(sp_context).__name__}")
        ctx = sp_context
        if group is not None and group is not ctx.group:
            raise ValueError(f"{owner}: `group` differs from the group of `sp_context`; pass one of them")
        if split != "contiguous" and split != ctx.split:
            raise ValueError(f"{owner}: `split` {split!r} differs from the split of `sp_context` {ctx.split!r}")
        if cu_seqlens is not None:  # its form first: a list raised AttributeError here, which no rank reported
            check_cu_seqlens_form(owner, cu_seqlens)
        if cu_seqlens is not None and (ctx.cu_seqlens is None or
                                       not torch.equal(cu_seqlens.detach().to("cpu", torch.int64), ctx.cu_seqlens)):
            raise ValueError(f"{owner}: `cu_seqlens` differs from the cu_seqlens of `sp_context`; pass one of them")
        if local_len != ctx.local_len:
            raise ValueError(f"{owner}: `q` has {local_len} tokens a rank but `sp_context` was built for "
                             f"{ctx.local_len} ({ctx.seqlen} over {ctx.world_size} ranks)")
    if ctx.cu_seqlens is not None:
        check_packed_batch(owner, batch)
    return ctx


__all__ = ["SPContext", "build_sp_context", "check_cu_seqlens", "layout_context", "resolve_sp_context",
           "sp_context_for"]
