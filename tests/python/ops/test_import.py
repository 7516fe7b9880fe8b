"""`import lasp2` stays cheap: every rank of a multi-process job pays it.

torch.compiler.assume_constant_result imports torch._dynamo (seconds); lasp2 marks its
constant-result function itself, so both halves are checked: the import leaves dynamo
out, and the mark lasp2 sets is the one torch's decorator sets.
"""

import subprocess
import sys

import torch


def test_import_does_not_load_dynamo():
    code = "import sys, lasp2; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing lasp2 imported torch._dynamo"


def test_constant_result_mark_is_torchs():
    from lasp2.ops._delta_library import _assume_constant_result, _named_group_handle

    def f():
        return 1

    marked = torch.compiler.assume_constant_result(f)
    ours = _assume_constant_result(lambda: 1)
    torch_marks = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert torch_marks == {"_dynamo_marked_constant"}, torch_marks
    assert ours._dynamo_marked_constant is True and _named_group_handle._dynamo_marked_constant is True
