"""Benchmarks that print numbers (speed is measured here, never asserted by a timed test).

    python -m breakhis.bench loader --data data/BreaKHis_v1   # our loader vs Pillow + torchvision + DataLoader
    python -m breakhis.bench train --backbone resnet50        # training img/s: channels-last, AMP, compile
    python -m breakhis.bench frozen --data data/BreaKHis_v1   # frozen backbone: feature cache vs none
    python -m breakhis.bench sweep                            # 64 frozen-head trials vs their epochs alone
    python -m breakhis.bench eva                              # the eva protocol's probes: ours vs torch.optim + autograd
    python -m breakhis.bench pipeline --data /tmp/full --json # every stage at full size: seconds, peak memory
    python -m breakhis.bench gpu --json gpu.json              # every check only a GPU can show (exit 2 without CUDA)
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import UserError, guard
from . import coverage, eva, frozen, gpu, loader, pipeline, sweep, train

BENCHMARKS = {"loader": loader.main, "train": train.main, "frozen": frozen.main, "sweep": sweep.main, "eva": eva.main, "coverage": coverage.main,
              "pipeline": pipeline.main, "gpu": gpu.main}
USAGE = ("usage: python -m breakhis.bench {loader,train,frozen,sweep,eva,coverage,pipeline,gpu} ...\n"
         "  loader    our device loader vs Pillow + torchvision + DataLoader (python -m breakhis.bench loader -h)\n"
         "  train     training throughput of a backbone (python -m breakhis.bench train -h)\n"
         "  frozen    a frozen-backbone run with and without the feature cache (python -m breakhis.bench frozen -h)\n"
         "  sweep     a frozen-backbone sweep against its epochs alone (python -m breakhis.bench sweep -h)\n"
         "  eva       the eva protocol's probes timed, ours vs torch.optim (python -m breakhis.bench eva -h)\n"
         "  coverage  interval coverage and false positives, simulated (python -m breakhis.bench coverage -h)\n"
         "  pipeline  every stage on one tree: seconds and peak memory (python -m breakhis.bench pipeline -h)\n"
         "  gpu       every check only a GPU can show, figures to JSON (python -m breakhis.bench gpu -h)")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a benchmark by its name, the first argument."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv:
        raise UserError("choose a benchmark: python -m breakhis.bench loader --data ROOT (or train; -h for help)")
    if argv[0] not in BENCHMARKS:
        raise UserError(f"unknown benchmark {argv[0]!r}: choose {', '.join(BENCHMARKS)}, e.g. "
                        f"python -m breakhis.bench loader --data data/demo")
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(guard(main))
