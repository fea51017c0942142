"""torch._grouped_mm column for bench_grouped_matmul.py, run in its own process.

  python3 experiments/bench_grouped_matmul_torch.py SPEC.json   (rows: E, M, K, N, group_sizes)
Prints one JSON line: per row {fwd_ms, fwd_bwd_ms} (median, CUDA events) or {error}.
"""
import json
import statistics
import sys

import torch


def bench(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def row(spec, reps):
    e, m, k, n = spec["E"], spec["M"], spec["K"], spec["N"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(e, k, n, device="cuda") / k ** 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    offs = torch.cumsum(torch.tensor(spec["group_sizes"], device="cuda"), 0).to(torch.int32)
    fwd = lambda: torch._grouped_mm(x, w, offs=offs)

    def fwd_bwd():
        y = torch._grouped_mm(x, w, offs=offs)
        return torch.autograd.grad(y, (x, w), dy)

    with torch.no_grad():
        t_f = bench(fwd, reps)
    t_fb = bench(fwd_bwd, reps)
    return {"fwd_ms": t_f, "fwd_bwd_ms": t_fb}


def main():
    spec = json.load(open(sys.argv[1]))
    out = []
    for r in spec["rows"]:
        try:
            out.append(row(r, spec["reps"]))
        except Exception as ex:
            out.append({"error": f"{type(ex).__name__}: {str(ex)[:300]}"})
        print(r["E"], r["K"], r["N"], r["pattern"], out[-1], file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
