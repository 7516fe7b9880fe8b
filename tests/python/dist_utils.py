"""Compatibility name for the Megatron tests that still `from dist_utils import
run_distributed`; new tests import lasp2_testing.dist. Removed once the Megatron
tests move to tests/python/megatron/."""

from lasp2_testing.dist import run_distributed

__all__ = ["run_distributed"]
