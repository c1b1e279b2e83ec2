"""KernelConfig (fms.modules.kernel_config): validation, get_model(kernels=) / model.set_kernels, and that each
model's layers keep their own choice (GEMV on or off, the SSD scan) with nothing process-wide.

On CPU the GEMV kernel runs in Triton's interpreter: `fits` (up to two CUDA rows only) is widened to up to two rows
of the weight's dtype on any device so that a one-token forward reaches it, and every launch is counted.
"""

import pytest
import torch

from fms.models import get_model
from fms.modules import linear as linear_mod
from fms.modules import ssm
from fms.modules.kernel_config import SSD_SCAN_NAMES, KernelConfig, apply_kernels
from fms.modules.linear import Linear
from fms.modules.ssm import Mamba2Mixer

# fp32 logits of the same weights through the kernel and through F.linear: sums of <= 128 products in
# another order, then a few layers; the outputs are O(1)
ATOL, RTOL = 1e-4, 1e-4


def test_defaults_are_todays_behaviour():
    assert KernelConfig() == KernelConfig(gemv=True, ssd_scan="auto", gemv_rows=2, fuse_norm=False)
    assert SSD_SCAN_NAMES == ("auto", "triton", "fla", "reference", "recurrent")
    with pytest.raises(Exception):  # frozen: a config is replaced, never edited in place
        KernelConfig().gemv = False


@pytest.mark.parametrize("value", [1, 0, "yes", "0", None])
def test_bad_gemv_is_refused_naming_the_value(value):
    with pytest.raises(ValueError) as exc:
        KernelConfig(gemv=value)
    assert f"KernelConfig.gemv must be True or False, got {value!r}" in str(exc.value)


@pytest.mark.parametrize("value", ["warp", "Triton", "", None, 1])
def test_bad_ssd_scan_is_refused_naming_the_value_and_the_allowed_ones(value):
    with pytest.raises(ValueError) as exc:
        KernelConfig(ssd_scan=value)
    message = str(exc.value)
    assert f"got {value!r}" in message
    assert "auto, triton, fla, reference, recurrent" in message


def test_get_model_and_set_kernels_refuse_something_else_than_a_config():
    with pytest.raises(TypeError, match="kernels must be a KernelConfig.*'triton'"):
        get_model("llama", "nano", kernels="triton")
    model = get_model("llama", "nano")
    with pytest.raises(TypeError, match=r"got \{'gemv': False\}"):
        model.set_kernels({"gemv": False})
    assert model.kernels == KernelConfig()


@pytest.mark.parametrize(("env", "gemv", "rows"), [(None, True, 2), ("", True, 2), ("2", True, 2), ("1", True, 1),
                                                  ("0", False, 2)])
def test_fms_gemv_sets_only_the_default_at_build_time(monkeypatch, env, gemv, rows):
    if env is None:
        monkeypatch.delenv("FMS_GEMV", raising=False)
    else:
        monkeypatch.setenv("FMS_GEMV", env)
    assert KernelConfig.from_env() == KernelConfig(gemv=gemv, gemv_rows=rows)
    model = get_model("llama", "nano")
    assert model.kernels == KernelConfig(gemv=gemv, gemv_rows=rows) and model.head.kernels.gemv is gemv
    assert all(m.kernels.gemv_rows == rows for m in _linears(model))
    # an explicit config wins over the environment
    assert get_model("llama", "nano", kernels=KernelConfig(gemv=not gemv)).kernels.gemv is (not gemv)
    # the environment is read when a model is built, never later
    monkeypatch.setenv("FMS_GEMV", "1" if env == "0" else "0")
    assert model.kernels.gemv is gemv and all(m.kernels.gemv is gemv for m in _linears(model))


@pytest.mark.parametrize("env", ["false", "no", "3", " 0"])
def test_bad_fms_gemv_is_refused_naming_it(monkeypatch, env):
    monkeypatch.setenv("FMS_GEMV", env)
    with pytest.raises(ValueError) as exc:
        get_model("llama", "nano")
    assert f"FMS_GEMV={env!r}" in str(exc.value)
    assert all(f"'{n}'" in str(exc.value) for n in "012")


@pytest.mark.parametrize("value", [0, 3, True, 1.5, "2", None])
def test_bad_gemv_rows_is_refused_naming_the_value(value):
    with pytest.raises(ValueError) as exc:
        KernelConfig(gemv_rows=value)
    assert f"KernelConfig.gemv_rows must be an int from 1 to 2, got {value!r}" in str(exc.value)


@pytest.mark.parametrize(("env", "fuse"), [(None, False), ("", False), ("0", False), ("1", True)])
def test_fms_fuse_norm_sets_the_default_at_build_time(monkeypatch, env, fuse):
    monkeypatch.delenv("FMS_GEMV", raising=False)
    if env is None:
        monkeypatch.delenv("FMS_FUSE_NORM", raising=False)
    else:
        monkeypatch.setenv("FMS_FUSE_NORM", env)
    assert KernelConfig.from_env() == KernelConfig(fuse_norm=fuse)
    model = get_model("llama", "nano")
    assert model.kernels.fuse_norm is fuse and all(b.fuse_mixer is fuse and b.fuse_ff is fuse for b in model.layers)
    monkeypatch.setenv("FMS_GEMV", "1")  # both switches read together
    assert KernelConfig.from_env() == KernelConfig(gemv_rows=1, fuse_norm=fuse)


@pytest.mark.parametrize("env", ["true", "2", " 1"])
def test_bad_fms_fuse_norm_is_refused_naming_it(monkeypatch, env):
    monkeypatch.setenv("FMS_FUSE_NORM", env)
    with pytest.raises(ValueError) as exc:
        get_model("llama", "nano")
    assert f"FMS_FUSE_NORM={env!r}" in str(exc.value) and "'1'" in str(exc.value) and "'0'" in str(exc.value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_fuse_norm_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=f"KernelConfig.fuse_norm must be True or False, got {value!r}"):
        KernelConfig(fuse_norm=value)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


def _mixers(model):
    return [m for m in model.modules() if isinstance(m, Mamba2Mixer)]


@pytest.fixture
def gemv_launches(monkeypatch):
    """Let up to MAX_ROWS rows of the weight's dtype reach the kernel (the interpreter on CPU); returns the launch
    log."""
    from fms.triton import gemv as gemv_mod

    pytest.importorskip("triton", reason="triton is not installed; the GEMV kernel needs it")
    launches = []

    def launch(x, w, b=None, silu_mul=False, max_rows=gemv_mod.MAX_ROWS, **fusion):
        launches.append("swiglu_down" if silu_mul else "linear")
        # fewer, larger programs than the tuned blocks: every program is Python in the interpreter
        return gemv_mod.gemv(x, w, b, silu_mul, None if x.is_cuda else (32, 64, 1, 1), max_rows=max_rows, **fusion)

    monkeypatch.setattr(linear_mod, "gemv", launch)
    if not torch.cuda.is_available():
        monkeypatch.setattr(linear_mod, "fits", lambda x, w, max_rows=gemv_mod.MAX_ROWS:
                            x.numel() <= max_rows * x.shape[-1] and x.dtype == w.dtype)
    return launches


@torch.no_grad()
def test_gemv_off_gives_the_same_outputs_and_never_launches_the_kernel(gemv_launches):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on = get_model("llama", "nano", device_type=device, data_type="fp32", seed=3, kernels=KernelConfig(gemv=True))
    off = get_model("llama", "nano", device_type=device, data_type="fp32", seed=3, kernels=KernelConfig(gemv=False))
    assert all(m.kernels.gemv for m in _linears(on)) and not any(m.kernels.gemv for m in _linears(off))
    ids = torch.tensor([[17]], device=device)  # one token: every projection multiplies a single row

    # interleaved: building or running one model changes nothing in the other
    logits_off = off(ids)
    assert gemv_launches == []
    logits_on = on(ids)
    # per layer: qkv, attention output, gate|up, the fused SwiGLU down projection; then the LM head
    assert gemv_launches == ["linear", "linear", "linear", "swiglu_down"] * on.config.num_layers + ["linear"]
    gemv_launches.clear()
    torch.testing.assert_close(off(ids), logits_off, atol=0, rtol=0)
    assert gemv_launches == []
    torch.testing.assert_close(logits_on, logits_off, atol=ATOL, rtol=RTOL)
    assert logits_on.shape == (1, 1, on.config.vocab_size) and logits_on.std() > 0.1  # not a constant output

    # more than MAX_ROWS (2) rows never fit: the kernel stays out even with gemv on
    rows = torch.tensor([[17, 3, 250]], device=device)
    torch.testing.assert_close(on(rows), off(rows), atol=ATOL, rtol=RTOL)
    assert gemv_launches == []

    # set_kernels flips one model only
    on.set_kernels(KernelConfig(gemv=False))
    on(ids)
    assert gemv_launches == [] and off.kernels == on.kernels == KernelConfig(gemv=False)
    off.set_kernels(KernelConfig())
    off(ids)
    assert len(gemv_launches) == 4 * off.config.num_layers + 1 and on.kernels == KernelConfig(gemv=False)


def _hybrid(ssd_scan: str):
    return get_model("granite_hybrid", "h-nano", data_type="fp32", seed=5, kernels=KernelConfig(ssd_scan=ssd_scan))


@pytest.fixture(scope="module")
def prompt():
    # 37 tokens: two full 16-token chunks of h-nano's Mamba config and a partial one (the carry between chunks)
    return torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference_logits(prompt):
    with torch.no_grad():
        return _hybrid("reference")(prompt)


@torch.no_grad()
@pytest.mark.parametrize("ssd_scan", ["auto", "recurrent", "triton"])
def test_each_scan_that_runs_on_cpu_equals_the_reference(prompt, reference_logits, ssd_scan):
    if ssd_scan == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        if not ssm.ssd_scan.can_run_triton(torch.device("cpu")):
            pytest.skip("the Triton scan runs on CPU only in Triton's interpreter (TRITON_INTERPRET=1)")
    model = _hybrid(ssd_scan)
    assert [m.kernels.ssd_scan for m in _mixers(model)] == [ssd_scan] * len(_mixers(model)) != []
    torch.testing.assert_close(model(prompt), reference_logits, atol=ATOL, rtol=RTOL)
    assert reference_logits.std() > 0.1


@torch.no_grad()
def test_two_models_keep_their_own_scan(monkeypatch, prompt, reference_logits):
    """No global: a model built for the recurrent scan runs it, one built for the reference never does, in
    either order, and switching one model leaves the other's choice alone."""
    calls = []
    recurrent = ssm.ssd_scan_recurrent

    def counted(*args, **kwargs):
        calls.append(1)
        return recurrent(*args, **kwargs)

    monkeypatch.setattr(ssm, "ssd_scan_recurrent", counted)
    slow, ref = _hybrid("recurrent"), _hybrid("reference")
    num_mamba = len(_mixers(slow))
    assert num_mamba == sum(t == "mamba" for t in slow.config.layer_types) > 0
    ref_out = ref(prompt)
    assert calls == []
    slow_out = slow(prompt)
    assert len(calls) == num_mamba
    ref(prompt)
    assert len(calls) == num_mamba
    torch.testing.assert_close(slow_out, reference_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ref_out, reference_logits, atol=0, rtol=0)

    slow.set_kernels(KernelConfig(ssd_scan="reference"))
    slow(prompt)
    assert len(calls) == num_mamba and ref.kernels == KernelConfig(ssd_scan="reference")
    ref.set_kernels(KernelConfig(ssd_scan="recurrent"))
    ref(prompt)
    assert len(calls) == 2 * num_mamba and slow.kernels.ssd_scan == "reference"


def test_a_scan_that_cannot_run_is_refused_and_leaves_every_layer_as_it_was():
    model = _hybrid("recurrent")
    before = {name: m.kernels for name, m in model.named_modules() if hasattr(m, "kernels")}
    if not ssm._fla_available():
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            model.set_kernels(KernelConfig(gemv=False, ssd_scan="fla"))
        assert {name: m.kernels for name, m in model.named_modules() if hasattr(m, "kernels")} == before
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            _hybrid("fla")
    else:  # importable, but its kernel needs CUDA
        model.set_kernels(KernelConfig(ssd_scan="fla"))
        with pytest.raises(RuntimeError, match="CUDA only"), torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))


def test_apply_kernels_reaches_a_bare_mixer_and_its_projections():
    mixer = Mamba2Mixer(get_model("granite_hybrid", "h-nano").config.mamba_config())
    holder = torch.nn.Sequential(mixer)
    apply_kernels(holder, KernelConfig(gemv=False, ssd_scan="recurrent"))
    assert mixer.kernels == mixer.in_proj.kernels == mixer.out_proj.kernels == KernelConfig(False, "recurrent")
    with pytest.raises(TypeError, match="got 'recurrent'"):
        apply_kernels(holder, "recurrent")
