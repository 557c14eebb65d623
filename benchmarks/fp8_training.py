"""The demo LM trained with and without FP8 expert GEMMs: same preset, steps, seed and data.

    PYTHONPATH=. python benchmarks/fp8_training.py                 # cpu128, 500 steps
    PYTHONPATH=. python benchmarks/fp8_training.py --preset gpu --steps 300 --out PATH

Prints both runs' final losses (mean of the last 10 steps, as the demo reports) and
the relative gap |fp8 - baseline| / baseline; writes the records to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax

from jaxmoe import demo


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu128", choices=sorted(demo.PRESETS))
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--backend", default="auto")
  p.add_argument("--out", default="benchmarks/results/fp8_training.json")
  args = p.parse_args(argv)
  common = ["--preset", args.preset, "--steps", str(args.steps), "--seed", str(args.seed),
            "--backend", args.backend]
  records = []
  for fp8 in (False, True):
    summary = demo.train(demo.parse_args(common + (["--fp8"] if fp8 else [])))
    records.append({"preset": args.preset, "steps": args.steps, "seed": args.seed,
                    "backend": args.backend, "fp8": fp8,
                    "first_loss": round(summary["first_loss"], 5),
                    "last_loss": round(summary["last_loss"], 5),
                    "tokens_per_s": round(summary["tokens_per_s"])})
  base, fp8 = (r["last_loss"] for r in records)
  gap = abs(fp8 - base) / base
  print(f"final loss (mean of the last 10 steps): baseline {base:.4f}, fp8 {fp8:.4f}; "
        f"relative gap {gap:.2%}")
  result = {"card": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "PYTHONPATH=. python benchmarks/fp8_training.py " + " ".join(common),
            "relative_gap": round(gap, 5), "records": records}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
