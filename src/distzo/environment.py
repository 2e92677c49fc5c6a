"""The software stack and device kind a run's numbers depend on.

Replay and resume are bit-exact only where the kernels are the same: another torch,
transformers, CUDA build, Triton or GPU model may round differently. So a run records
these, and a replay elsewhere can say that exactness is not promised there.

    describe(torch.device("cuda"))
    # {"distzo": "0.1.0", "torch": "2.5.1+cu124", "transformers": "4.46.0", "cuda": "12.4",
    #  "triton": "3.1.0", "device": "NVIDIA H200"}
"""

from __future__ import annotations

import torch
import transformers

from distzo import __version__


def describe(device: torch.device | str, quantized: bool = False) -> dict[str, str | None]:
    """Versions of distzo, torch, transformers, the CUDA build and Triton (None where absent),
    and the kind of ``device`` (``"cpu"``, or the GPU's model name). With ``quantized`` (a base
    quantized by bitsandbytes) also bitsandbytes', which makes the base's bits; other runs do
    not depend on it, so their records leave it out."""
    stack = {
        "distzo": __version__,
        "torch": str(torch.__version__),  # a TorchVersion otherwise
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "device": device_kind(torch.device(device)),
    }
    return {**stack, "bitsandbytes": bitsandbytes_version()} if quantized else stack


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes version (read without importing it: its import is slow), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def device_kind(device: torch.device) -> str:
    # Two GPUs of the same model give the same bits; the index does not matter.
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
