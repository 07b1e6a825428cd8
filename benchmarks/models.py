"""Training speed of every backbone, and how much of the machine it uses.

For each backbone at the papers' width (1.0) and a small variant (0.25): training clips/s
(forward + backward + SGD step on 10 s clips), the achieved GFLOP/s (3 x 2 x counted MACs per
clip x clips/s: backward costs about twice the forward) and that rate as a fraction of this
machine's fp32 matrix-multiply rate, measured in the same run.

    python benchmarks/models.py
    python benchmarks/models.py --device cuda --amp bf16     # on a GPU
    python benchmarks/models.py --smoke-test
"""

from __future__ import annotations

import argparse
import time

import torch
from common import md_table, write_results  # the script folder is on sys.path

from raysc.models import count_macs, create_model, list_models
from raysc.models.summary import training_throughput


def matmul_gflops(device: str, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="backbones (default: all)")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16"], default=None)
    parser.add_argument("--smoke-test", action="store_true", help="small widths, 1 s clips")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.widths, args.seconds, args.batch = [0.125], 1.0, 2
    names = args.names or list_models()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak = matmul_gflops(args.device, dtype)
    rows, runs = [], []
    for name in names:
        for width in args.widths:
            torch.manual_seed(0)
            model = create_model(name, width=width)
            macs = count_macs(model, seconds=args.seconds)
            tput = training_throughput(
                model,
                batch=args.batch,
                seconds=args.seconds,
                device=args.device,
                amp=args.amp,
                min_steps=1,
                min_time=2.0,
            )
            gflops = 6 * macs * tput / 1e9
            params = sum(p.numel() for p in model.parameters())
            runs.append(
                {
                    "backbone": name,
                    "width": width,
                    "params": params,
                    "macs_per_clip": macs,
                    "train_clips_per_s": tput,
                    "gflops": gflops,
                    "fraction_of_matmul": gflops / peak,
                }
            )
            rows.append(
                [
                    name,
                    f"{width:g}",
                    f"{params:,}",
                    f"{macs / 1e9:.2f}",
                    f"{tput:.2f}",
                    f"{gflops:.1f}",
                    f"{gflops / peak:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    precision = "bf16 autocast" if args.amp else "fp32"
    cmd = " ".join(["python benchmarks/models.py", *args.names] + (["--smoke-test"] if args.smoke_test else []))
    md = (
        f"# Backbone training speed ({args.device}, {precision})\n\n`{cmd}`: batch {args.batch}, "
        f"{args.seconds:g} s clips; this machine's {precision} 2048x2048 matmul: {peak:.1f} GFLOP/s.\n\n"
        + md_table(["backbone", "width", "params", "GMACs/clip", "train clips/s", "GFLOP/s", "of matmul"], rows)
    )
    return write_results(
        f"models_{args.device}" + ("_bf16" if args.amp else "") + ("_smoke" if args.smoke_test else ""),
        {"args": vars(args), "matmul_gflops": peak, "runs": runs},
        md,
    )


if __name__ == "__main__":
    raise SystemExit(main())
