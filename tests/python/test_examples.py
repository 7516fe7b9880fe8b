"""The CPU commands the README and docs/megatron.md quote for the examples, run as
written (torchrun, 2 gloo processes): each must exit 0 and report a check against one
process within float32 noise. Before session 11 no test ran them, so a change that
broke README's main example would have passed CI."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{text[-3000:]}"
    return text


def numbers_after(text, label):
    return [float(x) for x in re.findall(label + r"\s*([0-9][0-9.]*(?:[eE][+-]?[0-9]+)?)", text)]


@pytest.mark.parametrize("extra", [[], ["--decay", "gate", "--split", "balanced"]], ids=["default", "balanced"])
def test_readme_main_example(extra):
    # README "Two commands": torchrun --standalone --nproc_per_node 2 examples/sp_linear_attention.py
    text = run(TORCHRUN + ["examples/sp_linear_attention.py", *extra])
    assert "->  OK" in text, text[-2000:]
    errors = numbers_after(text, r"output") + numbers_after(text, r"parameter grads")
    assert errors and max(errors) < 1e-4, errors


def test_hybrid_block_example():
    text = run(TORCHRUN + ["examples/hybrid_block.py", "--split", "balanced", "--pattern", "LLLS"])
    assert "-> OK" in text, text[-2000:]


def test_linear_moe_swap_example():
    run([sys.executable, "examples/linear_moe_swap.py"])
    text = run(TORCHRUN + ["examples/linear_moe_swap.py"])
    errors = numbers_after(text, r"rel\. error")
    assert len(errors) == 4 and max(errors) < 1e-4, (errors, text[-2000:])  # 2 ranks x (output, gradient)


def test_megatron_hybrid_gpt_example():
    # docs/megatron.md: the complete pretraining loop with --check against TP = CP = 1
    text = run(TORCHRUN + ["examples/megatron_hybrid_gpt.py", "--context-parallel-size", "2",
                           "--hybrid-layer-pattern", "LGLS", "--check"], timeout=600)
    worst = numbers_after(text, r"max relative loss difference over \d+ steps:")
    assert len(worst) == 1 and worst[0] < 1e-5, text[-2000:]
