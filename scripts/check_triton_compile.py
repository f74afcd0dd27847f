"""Ahead-of-time compile check of the block-op Triton kernels for sm_80 and sm_90 (no GPU needed).

Every variant the launchers can pick (each module's ``aot_cases()``: block sizes, warps, stages, dtypes)
is compiled with triton.compile for GPUTarget("cuda", 80 / 90, 32); the PTX is then run through Triton's
own ptxas with -v for registers and spills. A variant fails when it spills or when its shared memory
exceeds the target's per-block limit (sm_80 166,912 B, sm_90 232,448 B).

    .venv/bin/python scripts/check_triton_compile.py [--filter SUBSTRING] [--json OUT]

Prints one line per kernel × target and exits non-zero on any failure. TRITON_INTERPRET must be unset.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {80: 166_912, 90: 232_448}


def _ptxas_stats(ptx: str, cap: int):
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(cap)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return regs, stores, loads


def compile_case(fn, signature, launch, cap, aligned=True):
    """Compile one variant; ``aligned``: pointer arguments 16-byte aligned, the specialisation Triton's
    launcher picks for tensors at the start of their storage (fresh allocations)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in launch.constexprs]
    if missing:
        raise ValueError(f"no type or constexpr value for {missing}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if aligned and t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(launch.constexprs), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=launch.options())
    regs, stores, loads = _ptxas_stats(k.asm["ptx"], cap)
    return dict(regs=regs, spill_stores=stores, spill_loads=loads, smem=k.metadata.shared)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", default="", help="only the variants whose name contains this")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--unaligned", action="store_true", help="no pointer alignment hints (views at an offset)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    from opt_fast.triton_kernels import block_apply, cayley_neumann

    rows, bad = [], 0
    for mod in (cayley_neumann, block_apply):
        for name, fn, signature, launch in mod.aot_cases():
            if args.filter not in name:
                continue
            for cap in (80, 90):
                t0 = time.time()
                try:
                    r = compile_case(fn, signature, launch, cap, aligned=not args.unaligned)
                except Exception as e:  # report every failing variant, not only the first
                    r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                r.update(name=name, sm=cap, num_warps=launch.num_warps, num_stages=launch.num_stages,
                         seconds=round(time.time() - t0, 1))
                ok = "error" not in r and r["spill_stores"] == 0 and r["spill_loads"] == 0 \
                    and r["smem"] <= SMEM_LIMIT[cap]
                r["ok"] = ok
                bad += not ok
                rows.append(r)
                if "error" in r:
                    print(f"FAIL sm_{cap} {name}: {r['error']}", flush=True)
                else:
                    print(f"{'ok  ' if ok else 'FAIL'} sm_{cap} {name} warps={launch.num_warps} "
                          f"stages={launch.num_stages}: regs {r['regs']}, spills {r['spill_stores']}/"
                          f"{r['spill_loads']} B, smem {r['smem']} B ({r['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows) - bad} of {len(rows)} kernel variants compile for sm_80/sm_90 without spills "
          f"within shared memory limits")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
