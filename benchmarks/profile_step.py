"""Where an LGD training step spends its time: torch.profiler's top operators, baseline vs LGD.

    python benchmarks/profile_step.py            # RetinaNet R-50-FPN, 512x512, batch 2, K=80, 10 objects/image
    python benchmarks/profile_step.py --quick    # tiny sizes

Prints two tables (self CPU time per operator); the LGD table also lists the forward time under the regions
LGD labels with record_function: lgd.teacher, lgd.heads (student and teacher head passes), lgd.distill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from cost import make_batch, training_stepper  # noqa: E402

from lgd.config import LGDConfig, ModelConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    if args.quick:
        cfg, k = ModelConfig(depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=64), 3
        batch = make_batch("retinanet", 2, 64, 3, k)
    else:
        cfg, k = ModelConfig(depth=50, fpn_channels=256, norm="frozen_bn", min_size=[512], max_size=512), 80
        batch = make_batch("retinanet", 2, 512, 10, k)
    for name, lgd in (("baseline", False), ("LGD", True)):
        stepper = training_stepper(cfg, k, lgd, LGDConfig(pre_distill_iters=0))
        stepper(*batch, stop_requested=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(f"step/{name}"):
                stepper(*batch, stop_requested=False)
        print(f"\n=== {name}: top operators by self CPU time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main(sys.argv[1:])
