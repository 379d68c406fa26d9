"""The planner's answer for the MLPerf DLRMv2 tables on 8, 16 and 64 GPUs (``python -m dqrm.pipeline.scale``),
saved with its command, commit and machine as ``bench/results/scale_plans.{json,txt}``; seconds, no GPU needed.

    python -m bench.scale_plans [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from bench.common import add_out_argument, save
from dqrm.pipeline import scale


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale_plans", description=__doc__.split("\n\n")[0])
    add_out_argument(p)
    args = p.parse_args()
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        numbers = Path(tmp) / "scale.json"
        with contextlib.redirect_stdout(printed):  # the planner's report, as it prints it (warnings go to stderr)
            if scale.main(["--gpus", "8,16,64", "--json", str(numbers)]) != 0:
                raise SystemExit("dqrm.pipeline.scale failed")
        payload = json.loads(numbers.read_text())
    print(printed.getvalue(), end="")
    print(f"json: {save('scale_plans', payload, printed.getvalue(), out=args.out)}")


if __name__ == "__main__":
    main()
