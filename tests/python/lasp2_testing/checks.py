"""The error measure every test uses: max-norm error relative to the reference."""

import torch.distributed as dist


def rel_err(got, want, floor=1e-4):
    """max |got - want| / max |want|, the denominator at least `floor` (references that
    are zero everywhere, e.g. a gate gradient over one token, compare absolutely)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def assert_rel(got, want, tol, what, floor=1e-4):
    err = rel_err(got, want, floor)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def assert_sp_matches(o, grads, ref, o_full, grads_full, local, gate, tol, where, group):
    """One rank's linear-attention output and gradients (dq, dk, dv[, dg or d decay])
    against the float64 reference and the single-process run on the whole sequence.
    `local` maps a whole-sequence tensor to this rank's share; `gate` is "g", "decay"
    or None. Gate gradients cancel (O(1) terms), so they compare at the O(1) scale."""
    assert_rel(o, local(ref), tol, f"{where}: o vs float64 reference")
    assert_rel(o, local(o_full), tol, f"{where}: o vs single process")
    for name, got, want in zip(["dq", "dk", "dv"], grads, grads_full):
        assert_rel(got, local(want), tol, f"{where}: {name}")
    if gate == "g":
        assert_rel(grads[3], local(grads_full[3]), 10 * tol, f"{where}: dg", floor=1.0)
    elif gate == "decay":
        # parameter gradients are partial sums per rank; their sum is the full gradient
        total = grads[3].clone()
        dist.all_reduce(total, group=group)
        assert_rel(total, grads_full[3], 10 * tol, f"{where}: d decay (summed over ranks)", floor=1.0)


def expect_value_error(fn, want: str, what: str):
    """fn() must raise a ValueError whose message holds `want` (on this rank)."""
    try:
        fn()
    except ValueError as e:
        assert want in str(e), f"{what}: {e}"
    else:
        raise AssertionError(f"{what}: no ValueError")
