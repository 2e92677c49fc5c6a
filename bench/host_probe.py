"""Host-side cost of one fused launch, by piece (for docs/kernels.md)."""
import cProfile
import io
import pstats
import time

import torch

from distzo.kernels import triton_ops as K
from distzo.records import zo_sgd


def per_call(fn, calls=3000):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return dt


small = torch.randn(4096, device="cuda").to(torch.bfloat16)
pend = zo_sgd(0, [123456789], [3.5], 1e-6, 0.0)
dev = small.device
sc = K._scalars(pend, "gaussian", (9,), ((1e-3, -1e-3),), dev)
buf = torch.empty((2, 4096), dtype=small.dtype, device=dev)
print("whole call        %.1f us" % per_call(lambda: K.update_and_shadows(small, 5, pend, "gaussian", 9, (1e-3, -1e-3))))
print("empty (2, n)      %.1f us" % per_call(lambda: torch.empty((2, 4096), dtype=small.dtype, device=dev)))
print("_scalars lookup   %.1f us" % per_call(lambda: K._scalars(pend, "gaussian", (9,), ((1e-3, -1e-3),), dev)))
print("_launch           %.1f us" % per_call(lambda: K._launch(small, buf, True, True, 5, sc, False)))
spec_kernel = next(iter(K._COMPILED.values()))
args = (small, buf, 4096, 5, 0, sc.seeds_t, sc.coef_t, 0.0)  # as _launch passes them
consts = (1, 1, True, False, K._SR_BF16, 1, True, True, 0, K.FAST_MATH, False, 16, K._BLOCK)  # K._STEP_CONSTS
print("kernel.run only   %.1f us" % per_call(lambda: spec_kernel.run(4, 1, 1, torch._C._cuda_getCurrentRawStream(0), spec_kernel.function, spec_kernel.packed_metadata, None, None, None, *args, *consts)))
print("current_device    %.1f us" % per_call(lambda: torch.cuda.current_device()))
print("device.index      %.1f us" % per_call(lambda: small.device.index))
pr = cProfile.Profile()
pr.enable()
for _ in range(3000):
    K.update_and_shadows(small, 5, pend, "gaussian", 9, (1e-3, -1e-3))
pr.disable()
torch.cuda.synchronize()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
print(s.getvalue()[-2500:])
