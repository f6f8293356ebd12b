"""Why the first call of the layer is slow (docs/install.rst, "The first call"): ``import implicit_nash``
does not import ``torch._dynamo``; the first torch.func gradient does (torch's own
``compiled_autograd._disable()`` in every vjp), a one-time cost per process. If a torch version stops
doing so, this test fails and the documentation must change."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys, torch
import implicit_nash as inn
after_import = "torch._dynamo" in sys.modules
theta = torch.tensor(1.0, requires_grad=True)
def costs(phi, theta):
    return torch.stack([0.5 * (phi[0, 0] - theta) ** 2 + phi[0, 0] * phi[1, 0], 0.5 * phi[1, 0] ** 2])
inn.nash_equilibrium(costs, torch.zeros(2, 1), theta).sum().backward()
print(json.dumps([after_import, "torch._dynamo" in sys.modules]))
"""


def test_torch_dynamo_is_imported_by_the_first_torch_func_gradient_not_by_implicit_nash():
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after_import, after_call = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not after_import
    assert after_call
