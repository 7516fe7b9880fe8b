"""Run Megatron-LM's own pretrain_gpt.py / pretrain_mamba.py with lasp2, no source edit:

    python -m megatron_patches.run pretrain_gpt.py --context-parallel-size 4 \\
        --sp-provider lasp2 --hybrid-layer-pattern LLLSLLLS ... (Megatron-LM's arguments)

Before the script runs, this registers the lasp2 argument group (add_lasp2_args) with
Megatron-LM's parser, and selects the lasp2 layer spec (`--spec megatron_patches.specs
lasp2_layer_spec`, or the TE one with --transformer-impl transformer_engine) whenever
--sp-provider is given and --spec is not: `--sp-provider` alone switches lasp2 on (lasp2's
other flags without it, or with --sp-provider none, are refused: nothing would read them).
With --sp-split contiguous it also installs megatron_patches.rope.use_lasp2_rope and
megatron_patches.batch.use_lasp2_batches (the script's get_batch_on_this_cp_rank cuts
Megatron's zig-zag layout, which the contiguous layers would misread without an error).

With --experimental-attention-variant gated_delta_net (megatron-core's Qwen3-Next style
hybrid) no --spec is added: Megatron-LM builds its own block spec, and install_core_gdn
makes megatron-core's GatedDeltaNet layers in it Lasp2CoreGatedDeltaNet
(megatron_patches.core_gdn, LASP-2 over the CP group) and lets Megatron-LM's
TransformerConfig take the variant with --context-parallel-size > 1: megatron-core's
CP assertion for it (0.16.1: CP must be 1; 0.19: heads divisible by TP x CP) is replaced
by lasp2's check of the --linear-* head flags, its other checks kept
(megatron_patches.core_gdn_config).
"""

from __future__ import annotations

import runpy
import sys
from typing import List, Optional

__all__ = ["install", "install_core_gdn", "main", "spec_args", "uses_core_gdn"]


def spec_args(argv: List[str]) -> List[str]:
    """argv plus `--spec megatron_patches.specs <spec>` when --sp-provider is given without --spec."""
    flags = {a.split("=", 1)[0] for a in argv}
    if "--spec" in flags:
        return list(argv)
    provider = _value(argv, "--sp-provider", "--lasp2-sp-provider")
    if provider in (None, "none"):
        orphans = sorted(flags & _lasp2_only_flags())
        if orphans:  # Megatron-LM's own spec never reads them (and --sp-split contiguous would
            # install lasp2's RoPE slicing over Megatron's zig-zag batches): refused, not ignored
            given = "given without --sp-provider" if provider is None else "given with --sp-provider none"
            raise SystemExit(f"{orphans[0]} is a lasp2 flag {given}: Megatron-LM's own spec never reads it; "
                             "the lasp2 spec is chosen by --sp-provider lasp2|lasp1|ulysses (or name one with --spec)")
        return list(argv)
    if uses_core_gdn(argv):  # Megatron's own spec (install_core_gdn swaps its GDN)
        if _value(argv, "--sp-split") == "contiguous":
            # that spec's softmax layers are Megatron's own attention, whose context parallelism
            # takes its zig-zag layout only: contiguous batches would be masked wrongly there, and
            # zig-zag ones misread by the GDN layers, either way without an error
            raise SystemExit("--sp-split contiguous with --experimental-attention-variant gated_delta_net: "
                             "Megatron-LM's own softmax layers in that hybrid take its zig-zag layout only; "
                             "use --sp-split balanced")
        return list(argv)
    te = _value(argv, "--transformer-impl") in (None, "transformer_engine")
    moe = _value(argv, "--num-experts") not in (None, "0")
    try:
        from megatron_patches.specs import HAVE_TE
    except ImportError:  # pragma: no cover - megatron-core missing: the script will say so
        HAVE_TE = False
    name = "lasp2_" + ("te_" if te and HAVE_TE else "") + ("moe_" if moe else "") + "layer_spec"
    return list(argv) + ["--spec", "megatron_patches.specs", name]


def _lasp2_only_flags() -> set:
    """The lasp2 group's flags that Megatron-LM does not define (read off add_lasp2_args, so the
    set cannot fall behind it): all of them but --sp-provider and the shared --hybrid-layer-pattern."""
    import argparse

    from megatron_patches.arguments import MEGATRON_PATTERN_FLAG, add_lasp2_args

    parser = add_lasp2_args(argparse.ArgumentParser(add_help=False))
    return set(parser._option_string_actions) - {"--sp-provider", "--lasp2-sp-provider", MEGATRON_PATTERN_FLAG}


def uses_core_gdn(argv: List[str]) -> bool:
    """megatron-core's gated DeltaNet hybrid with a lasp2 provider: its GDN layers go under LASP-2."""
    provider = _value(argv, "--sp-provider", "--lasp2-sp-provider")
    return provider not in (None, "none") and _value(argv, "--experimental-attention-variant") == "gated_delta_net"


def install_core_gdn() -> None:
    """megatron-core's get_gated_delta_net_module_spec (which its experimental block spec looks
    up at call time) returns the spec with Lasp2CoreGatedDeltaNet (options from the parsed
    --sp-* arguments when the layer is built), and TransformerConfig accepts the variant with
    --context-parallel-size > 1 (allow_core_gdn_context_parallel: lasp2's checks of the GDN
    flags instead of megatron-core's CP assertion, every other check kept). Idempotent."""
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as variants

    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel
    from megatron_patches.specs import use_lasp2_core_gdn

    allow_core_gdn_context_parallel()
    original = variants.get_gated_delta_net_module_spec
    if getattr(original, "lasp2", False):
        return

    def get_gated_delta_net_module_spec(config, backend=None):
        return use_lasp2_core_gdn(original(config=config, backend=backend))

    get_gated_delta_net_module_spec.lasp2 = True
    variants.get_gated_delta_net_module_spec = get_gated_delta_net_module_spec


def _value(argv: List[str], *flags: str) -> Optional[str]:
    """The value argparse will store for `flags` (spellings of one argument): the last one given."""
    value = None
    for i, arg in enumerate(argv):
        for flag in flags:
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    return value


def install() -> None:
    """Makes Megatron-LM's argument parser include the lasp2 group (add_lasp2_args runs after
    Megatron's own arguments, so it sees Megatron's --hybrid-layer-pattern where defined)."""
    from megatron.training import arguments

    from megatron_patches.arguments import add_lasp2_args

    original = arguments.add_megatron_arguments
    if getattr(original, "lasp2", False):
        return

    def add_megatron_arguments(parser):
        return add_lasp2_args(original(parser))

    add_megatron_arguments.lasp2 = True
    arguments.add_megatron_arguments = add_megatron_arguments  # parse_args looks it up at call time


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m megatron_patches.run <pretrain_gpt.py | pretrain_mamba.py> ARGS...")
    script, rest = argv[0], spec_args(argv[1:])
    install()
    if uses_core_gdn(rest):
        install_core_gdn()
    if _value(rest, "--sp-split") == "contiguous":
        from megatron_patches.batch import use_lasp2_batches
        from megatron_patches.rope import use_lasp2_rope

        use_lasp2_rope("contiguous")
        use_lasp2_batches("contiguous")  # the script's get_batch cuts the zig-zag layout otherwise
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
