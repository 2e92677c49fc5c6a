"""Resource report of the fused kernel, compiled for sm_90 without a GPU.

    PYTHONPATH=src python bench/kernel_sass.py [--block 1024] [--warps 2] [--all]

Needs only the triton package (it bundles ptxas and cuobjdump). Prints, per variant: SASS
instructions per thread, registers, stack, layout conversions in the TTGIR (each one a
shared-memory shuffle) and the widths of the global loads and stores.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from distzo.kernels import triton_ops as K

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _step_signature(dtype: str) -> dict:
    return {"p_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "n": "i32",
            "key_lo": "i32", "key_hi": "i32", "useeds_ptr": "*i64", "coef_ptr": "*fp32", "thr": "fp32"}


def _grouped_signature(dtype: str) -> dict:
    return {"p_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "table_ptr": "*i64", "useeds_ptr": "*i64",
            "coef_ptr": "*fp32"}


def build_grouped(dtype: str, sr: int, update: bool, shadows: bool, block: int, warps: int, q: int = 1,
                  kind: str = "gaussian", seeds: int = 1, minus: bool = True, adam: int = 0, tensors: int = 16):
    """A grouped launch over ``tensors`` tensors of one unit call (``_step_grouped_kernel``)."""
    consts = dict(T=tensors, Q=q, DIV=q, UPDATE=update, DECAY=update, SR=sr, NS=seeds, PLUS=shadows,
                  MINUS=shadows and minus, KIND=K._KINDS[kind], FAST=True, ADAM=adam, BLOCK=block)
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    return _compile(K._step_grouped_kernel, _grouped_signature(dtype), consts, warps, aligned)


def build(dtype: str, sr: int, update: bool, shadows: bool, block: int, warps: int, fast: bool = True, q: int = 1,
          kind: str = "gaussian", seeds: int = 1, minus: bool = True, adam: int = 0, div: int | None = None):
    """A variant as a run launches it on tensors whose length is a multiple of 16: ``seeds`` shadow
    seeds, each with a plus shadow and (``minus``) a minus shadow; the record's divisor ``div``
    (MeZO's q by default)."""
    consts = dict(Q=q, DIV=q if div is None else div, UPDATE=update, DECAY=False, SR=sr, NS=seeds, PLUS=shadows, MINUS=shadows and minus,
                  KIND=K._KINDS[kind], FAST=fast, MASKED=False, NDIV=16, ADAM=adam, BLOCK=block)
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(3)}  # both pointers and n
    return _compile(K._step_kernel, _step_signature(dtype), consts, warps, aligned)


def compile_all(block: int, warps: int) -> int:
    """Every constexpr combination a run can launch (dtype, kind, update, shadows of one seed or of
    several, mask, one or several directions, a length that is or is not a multiple of 16) and every
    draw: a kernel change that does not compile for sm_90 shows here, without a GPU."""
    count = 0
    shadows = ((1, False, False), (1, True, True), (1, True, False), (8, True, False))  # (NS, PLUS, MINUS)
    for (dtype, sr), kind, update, (ns, plus, minus), masked, q, ndiv in itertools.product(
            (("bf16", 1), ("fp16", 2), ("fp32", 0)), K._KINDS, (True, False), shadows, (True, False), (1, 3),
            (16, 1)):
        if update or plus:
            consts = dict(Q=q, DIV=q, UPDATE=update, DECAY=True, SR=sr, NS=ns, PLUS=plus, MINUS=minus,
                          KIND=K._KINDS[kind], FAST=True, MASKED=masked, NDIV=ndiv, ADAM=0, BLOCK=block)
            _compile(K._step_kernel, _step_signature(dtype), consts, warps)
            count += 1
    # Adam-like records (momentum's adam rule): h = 8 steps of one direction, h = 2 of two
    for (dtype, sr), kind, (ns, plus, minus), masked, (q, groups) in itertools.product(
            (("bf16", 1), ("fp16", 2), ("fp32", 0)), K._KINDS, shadows, (True, False), ((8, 8), (4, 2))):
        consts = dict(Q=q, DIV=1, UPDATE=True, DECAY=True, SR=sr, NS=ns, PLUS=plus, MINUS=minus,
                      KIND=K._KINDS[kind], FAST=True, MASKED=masked, NDIV=16, ADAM=groups, BLOCK=block)
        _compile(K._step_kernel, _step_signature(dtype), consts, warps)
        count += 1
    # grouped launches (one per unit call): the same record kinds, without masks
    for (dtype, sr), kind, update, (ns, plus, minus), (q, groups) in itertools.product(
            (("bf16", 1), ("fp16", 2), ("fp32", 0)), K._KINDS, (True, False), shadows, ((1, 0), (3, 0), (8, 8))):
        if (update or plus) and (update or groups == 0):
            consts = dict(T=16, Q=q, DIV=q if groups == 0 else 1, UPDATE=update, DECAY=update, SR=sr, NS=ns,
                          PLUS=plus, MINUS=minus, KIND=K._KINDS[kind], FAST=True, ADAM=groups, BLOCK=block)
            _compile(K._step_grouped_kernel, _grouped_signature(dtype), consts, warps)
            count += 1
    for what in range(6):
        sig = {"out_ptr": "*i64" if what == 3 else "*fp32", "n": "i32", "first_block": "i64", "key_lo": "i32",
               "key_hi": "i32", "seed_lo": "i32", "seed_hi": "i32"}
        _compile(K._draw_kernel, sig, dict(WHAT=what, FAST=True, BLOCK=block), warps)
        count += 1
    return count


def _compile(fn, sig: dict, consts: dict, warps: int, attrs: dict | None = None):
    sig = {**sig, **{name: "constexpr" for name in consts}}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def report(name: str, kernel) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)
    mix = collections.Counter(i.split(".")[0] for i in ins)
    mem = collections.Counter(i for i in ins if i.startswith(("LDG", "STG")))
    usage = " ".join(re.findall(r"REG:\d+|STACK:\d+", res))
    converts = kernel.asm["ttgir"].count("convert_layout")
    print(f"{name}: {len(ins)} instructions/thread, {usage}, convert_layout x{converts}, {dict(mem)}")
    print("   ", dict(mix.most_common(12)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=K._BLOCK)
    ap.add_argument("--warps", type=int, default=K._WARPS)
    ap.add_argument("--all", action="store_true", help="compile every launchable variant (no report)")
    a = ap.parse_args()
    if a.all:
        print(f"compiled {compile_all(a.block, a.warps)} kernel variants for sm_90")
        return
    per_thread = a.block // (32 * a.warps)
    print(f"block {a.block}, {a.warps} warps: {per_thread} elements per thread")
    report("bf16 update + shadows", build("bf16", 1, True, True, a.block, a.warps))
    report("bf16 shadows only", build("bf16", 1, False, True, a.block, a.warps))
    report("bf16 update only", build("bf16", 1, True, False, a.block, a.warps))
    report("bf16 update + shadows, grouped launch of 16 tensors", build_grouped("bf16", 1, True, True, a.block, a.warps))
    report("bf16 shadows only, grouped launch of 16 tensors", build_grouped("bf16", 1, False, True, a.block, a.warps))
    report("bf16 update + shadows, libdevice math", build("bf16", 1, True, True, a.block, a.warps, fast=False))
    report("fp32 update + shadows", build("fp32", 0, True, True, a.block, a.warps))
    report("fp16 update + shadows", build("fp16", 2, True, True, a.block, a.warps))
    report("bf16 adam rule h=8, packed signs: update + shadows",
           build("bf16", 1, True, True, a.block, a.warps, q=8, kind="rademacher-packed", adam=8))
    for kind in ("rademacher", "rademacher-packed"):
        report(f"bf16 update + shadows, {kind}", build("bf16", 1, True, True, a.block, a.warps, kind=kind))
    for kind in ("gaussian", "rademacher", "rademacher-packed", "rademacher-shared"):  # momentum's h = 8 record
        report(f"bf16 update of 8 directions + shadows, {kind}",
               build("bf16", 1, True, True, a.block, a.warps, q=8, kind=kind))
    for kind in ("rademacher", "rademacher-packed", "rademacher-shared"):
        # FZOO's N = 8 probes: one pass, 8 one-sided shadows (with the previous step's record of 8, or of 1)
        report(f"bf16 FZOO N=8 record (8 seeds, divisor 1) + 8 seeds' plus shadows, {kind}",
               build("bf16", 1, True, True, a.block, a.warps, q=8, div=1, kind=kind, seeds=8, minus=False))
        report(f"bf16 update + 8 seeds' plus shadows, {kind}",
               build("bf16", 1, True, True, a.block, a.warps, kind=kind, seeds=8, minus=False))
        report(f"bf16 update + 1 seed's plus shadow, {kind}",
               build("bf16", 1, True, True, a.block, a.warps, kind=kind, minus=False))


if __name__ == "__main__":
    main()
