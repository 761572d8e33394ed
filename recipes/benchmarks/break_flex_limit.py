"""Check that tests/test_backends.py's compiled-flex test can fail: with dynamo's default recompile limit
(the fix in plugins/flex.py undone), the test must fail. Prints PASS when it does."""
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import clear_surgery.plugins.flex as flex  # noqa: E402
import test_backends  # noqa: E402

torch._dynamo.config.recompile_limit = 8
flex._compiled_flex = lambda: torch.compile(flex_attention, dynamic=False)  # the limits left as they are
try:
    test_backends.test_gpu_flex_stays_compiled_across_many_resolutions()
except AssertionError as err:
    print("PASS: the test fails without the fix:", err)
else:
    print("FAIL: the test passed without the fix")
