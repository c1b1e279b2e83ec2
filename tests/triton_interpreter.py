"""Running fms Triton kernels on CPU in Triton's interpreter, for tests."""

import numpy as np


def patch_interpreter_for_numpy_2_4():
    """Triton <= 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound
    with int(array), which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream by
    squeezing first). Apply the same fix for this test process only; compiled kernels are
    unaffected."""
    if np.lib.NumpyVersion(np.__version__) < "2.4.0":
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "fms_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.fms_patched = True
    interpreter._patch_lang_tensor = patched



def fits_cpu_rows(cuda_fits):
    """A stand-in for fms.triton.gemv.fits: CUDA rows as cuda_fits decides; CPU rows of the weight's dtype, under
    Triton's interpreter, fit as CUDA rows would (at most max_rows rows eagerly, one token per row when compiled),
    so that the GEMV kernel runs there."""
    import os

    import torch

    from fms.triton import gemv as gemv_mod

    def fits(x, w, max_rows=gemv_mod.MAX_ROWS):
        if x.is_cuda or x.dtype != w.dtype or os.environ.get("TRITON_INTERPRET") != "1":
            return cuda_fits(x, w, max_rows)
        if torch.compiler.is_compiling():
            return gemv_mod.one_token_rows(x)
        return x.numel() <= max_rows * x.shape[-1]

    return fits
