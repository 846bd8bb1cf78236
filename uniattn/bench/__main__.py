"""The ``python -m uniattn.bench`` command line (see :mod:`uniattn.bench`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

SUBCOMMANDS = ("memory", "speed", "scale", "tune", "masks", "backward", "models", "ring")
ALL = ("memory", "speed", "scale", "masks", "backward", "models", "ring")
SIZED = ("memory", "speed", "models")  # the subcommands --n applies to
ON_DEVICE = ("memory", "speed", "tune")  # ... and --device


def main(argv=None) -> int:
    from uniattn import backends
    from uniattn.bench import plots

    parser = argparse.ArgumentParser(
        prog="python -m uniattn.bench", description="uniattn's benchmarks (see README)."
    )
    parser.add_argument("subcommand", choices=(*SUBCOMMANDS, "all"))
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(backends.REGISTRY),
        help="backend to measure (repeatable; default: every installed one)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument("--full", action="store_true", help="memory: up to n 2^18")
    parser.add_argument("--out", type=Path, help="directory for markdown, JSON and PNG results")
    parser.add_argument(
        "--n",
        type=int,
        action="append",
        help="sequence length to measure instead of the defaults (repeatable; memory, speed, models)",
    )
    parser.add_argument(
        "--device",
        help="the framework's name of the device to measure on, e.g. cuda (torch), gpu "
        "(JAX); default: each framework's default device (memory, speed, tune)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="speed: the inputs' dtype (the fused GPU kernels take 16-bit floats only)",
    )
    parser.add_argument("--causal", action="store_true", help="speed: causal attention")
    parser.add_argument(
        "--layout",
        default="BTHD",
        choices=("BTHD", "BHTD"),
        help="speed: the inputs' layout (BHTD: [batch, heads, length, dim], SDPA's)",
    )
    args = parser.parse_args(argv)
    chosen = ALL if args.subcommand == "all" else (args.subcommand,)
    if args.device and not set(chosen) <= set(ON_DEVICE):
        parser.error(f"--device applies to {', '.join(ON_DEVICE)} only")
    for flag, given in (
        ("--dtype", args.dtype != "float32"),
        ("--causal", args.causal),
        ("--layout", args.layout != "BTHD"),
    ):
        if given and args.subcommand != "speed":
            parser.error(f"{flag} applies to speed only")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    names = args.backend or backends.installed()
    for name in chosen:
        module = importlib.import_module(f"uniattn.bench.{name}")
        options = {"ns": args.n} if args.n and name in SIZED else {}
        options.update({"device": args.device} if args.device else {})
        if name == "speed":
            options.update(dtype=args.dtype, causal=args.causal, layout=args.layout)
        report = module.run(names, quick=args.quick, full=args.full, **options)
        print(report.markdown() + "\n", flush=True)
        if args.out:
            written = report.write(args.out)
            if plots.available():
                written += plots.plot(report, args.out)
            print(f"wrote {', '.join(str(p) for p in written)}\n", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
