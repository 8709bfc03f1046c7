"""Ahead-of-time compilation of every fused kernel variant for real GPUs, on a machine without one.

    TRITON_INTERPRET=1 python -m mabn.norms._aot capture variants.json      # the variants the layers launch
    python -m mabn.norms._aot compile variants.json --arch 80 90 --out resources.json

``capture`` runs the fused layers (bn, brn, mabn; float32, bfloat16, float16; NCHW and NHWC at a narrow and
a wide channel count; whole batch and grouped) under Triton's interpreter and records each launch's kernel,
argument types and constexprs: the variants are what real launches use, not a list typed by hand. ``compile``
builds each for ``sm_<arch>`` with the ptxas in the triton wheel (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``) and reads registers, stack, shared and local memory of each cubin with
the wheel's cuobjdump. A variant that fails to compile, or uses local memory (spills), is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_PTR = {"torch.float32": "*fp32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.int64": "*i64"}


def _arg_type(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return _PTR[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def capture_variants() -> list[dict]:
    """The distinct (kernel, argument types, constexprs, num_warps) of real fused launches (interpreter)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("capture needs TRITON_INTERPRET=1 set before triton is imported")
    import torch

    from . import BatchNorm2d, BatchRenorm2d, MABN2d, _fused

    record: list = []
    _fused.RECORD = record
    try:
        for cls in (BatchNorm2d, BatchRenorm2d, MABN2d):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for channels, channels_last in ((5, False), (8, True), (40, True)):
                    for group_size in (None, 2):
                        layer = cls(channels, group_size=group_size, impl="fused").train()
                        x = torch.randn(4, channels, 3, 3).to(dtype)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        x.requires_grad_(True)
                        layer(x).backward(torch.randn_like(x))
    finally:
        _fused.RECORD = None
    seen, variants = set(), []
    for name, _grid, args, meta in record:
        meta = dict(meta)
        warps = meta.pop("num_warps", 4)
        entry = {"kernel": name, "args": [_arg_type(a) for a in args], "constexprs": meta, "num_warps": warps}
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            variants.append(entry)
    return variants


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one captured variant for sm_<arch>; its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _fused_kernels

    fn = getattr(_fused_kernels, variant["kernel"])
    const = variant["constexprs"]
    runtime = [a for a in fn.arg_names if a not in const]
    if len(runtime) != len(variant["args"]):
        raise ValueError(f"{variant['kernel']}: {len(variant['args'])} captured arguments for {runtime}")
    signature = dict(zip(runtime, variant["args"], strict=True))
    signature.update({k: "constexpr" for k in const})
    src = ASTSource(fn, {a: signature[a] for a in fn.arg_names}, constexprs=dict(const))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"kernel": variant["kernel"], "arch": f"sm_{arch}", "num_warps": variant["num_warps"],
            "constexprs": const, "dtypes": sorted({a for a in variant["args"] if a.startswith("*")}),
            **{k.lower(): int(v) for k, v in usage.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("out", type=Path)
    comp = sub.add_parser("compile")
    comp.add_argument("variants", type=Path)
    comp.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    comp.add_argument("--out", type=Path, default=None)
    comp.add_argument("--record", type=Path, default=None,
                      help="also write a benchmark-style record (results/performance/kernels.json: rendered by "
                           "scripts/make_performance.py)")
    args = parser.parse_args(argv)
    if args.cmd == "capture":
        variants = capture_variants()
        args.out.write_text(json.dumps(variants, indent=1) + "\n")
        print(f"{len(variants)} kernel variants captured from real launches -> {args.out}")
        return 0
    variants = json.loads(args.variants.read_text())
    rows, failed = [], []
    for v in variants:
        for arch in args.arch:
            try:
                row = compile_variant(v, arch)
            except Exception as err:  # noqa: BLE001 - every failure is reported with its variant
                failed.append(f"{v['kernel']} sm_{arch} {v['constexprs']}: {type(err).__name__}: {err}")
                continue
            rows.append(row)
            if row.get("local", 0) or row.get("stack", 0):
                failed.append(f"{v['kernel']} sm_{arch} {v['constexprs']}: spills ({row})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.record and not failed:
        import torch
        import triton

        from ..benchmark import write_record

        write_record(args.record, "kernels", torch.device("cpu"),
                     {"arch": [f"sm_{a}" for a in args.arch], "triton": triton.__version__, "variants": len(variants),
                      "captured": str(args.variants)}, rows)
    print(f"{len(rows)} compiles of {len(variants)} variants for {', '.join(f'sm_{a}' for a in args.arch)}; "
          f"{len(failed)} failed")
    for line in failed:
        print("FAILED", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
