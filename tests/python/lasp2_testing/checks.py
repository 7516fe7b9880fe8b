"""The error measure every test uses: max-norm error relative to the reference."""


def rel_err(got, want, floor=1e-4):
    """max |got - want| / max |want|, the denominator at least `floor` (references that
    are zero everywhere, e.g. a gate gradient over one token, compare absolutely)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def assert_rel(got, want, tol, what, floor=1e-4):
    err = rel_err(got, want, floor)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"
