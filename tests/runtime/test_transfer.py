"""fms.runtime.transfer.to_device, and the engine's step code keeping to it after a forward is queued."""

import ast
from pathlib import Path

import pytest
import torch

from fms.runtime.sampler import SamplingTensors
from fms.runtime.sampling_params import SamplingParams
from fms.runtime.transfer import to_device

ROOT = Path(__file__).resolve().parents[2]
# the modules that run a step's host work between launches: engine step, decode windows, sampling, generate()
STEP_MODULES = ("fms/serving/model_runner.py", "fms/runtime/decode.py", "fms/runtime/sampler.py",
                "fms/utils/generation.py")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_to_device_keeps_values_and_dtype(device):
    t = torch.tensor([[3, -1], [7, 2**40]], dtype=torch.long)
    out = to_device(t, device)
    assert out.device.type == "cpu" and out.dtype == torch.long
    assert torch.equal(out, t)


@pytest.mark.parametrize("module", STEP_MODULES)
def test_step_code_builds_no_device_tensor_with_torch_tensor(module):
    """torch.tensor(values, device=<cuda>) waits for every queued kernel (a synchronizing copy from pageable memory);
    in a step's host work that leaves the GPU idle. These modules build host tensors and move them with to_device."""
    tree = ast.parse((ROOT / module).read_text())
    offenders = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "tensor"
                 and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                 and any(k.arg == "device" for k in node.keywords)]
    assert offenders == [], f"{module}: torch.tensor(..., device=...) at lines {offenders}; use to_device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_and_sampling_tensors_do_not_synchronize_while_work_is_queued():
    """Under torch's sync debug mode "error", a synchronizing call raises: a blocking copy does (the check works),
    to_device and SamplingTensors.build do not, with a long matmul chain still queued."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1)] * 3
    previous = torch.cuda.get_sync_debug_mode()
    try:
        for _ in range(20):
            a = a @ a * 1e-3
        torch.cuda.set_sync_debug_mode("error")
        with pytest.raises(RuntimeError):
            torch.tensor([1, 2, 3], device="cuda")
        out = to_device(torch.tensor([5, 6, 7], dtype=torch.long), "cuda")
        built = SamplingTensors.build(params, [1, 2, 3], 100, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert out.tolist() == [5, 6, 7]
    assert built.top_k.tolist() == [5, 5, 5] and built.temperature.device.type == "cuda"
