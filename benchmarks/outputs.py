"""Time and size of every Gaussian format of the output table (outputs.OUTPUTS) for a few model sizes; JSON out.

    python benchmarks/outputs.py --out benchmarks/results/cpu/outputs.json
    python benchmarks/outputs.py --sizes 3000 50000 --sh-degree 1

The model is the random one of tests/test_outputs.py (positions in the unit cube, colours over [0, 1], small
scales), written in the viewer frame through the table's writer, once per format and size;
``bytes_per_gaussian`` is the file size over N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_outputs import make_params  # noqa: E402 - the model the format tests use

from recdreamer_gs.outputs import OUTPUTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000])
    parser.add_argument("--sh-degree", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            params = make_params(n, args.sh_degree)
            for output in (o for o in OUTPUTS if o.kind == "gaussians"):
                path = Path(folder) / f"model{output.suffix}"
                start = time.perf_counter()
                output.write(path, params, "viewer")
                seconds = time.perf_counter() - start
                size = path.stat().st_size
                rows.append({"format": output.name, "gaussians": n, "sh_degree": args.sh_degree,
                             "seconds": round(seconds, 3), "bytes": size, "bytes_per_gaussian": round(size / n, 1)})
                print(f"{output.name:6s} N={n:>7,}  {seconds:7.3f} s  {size / n:6.1f} bytes/Gaussian", flush=True)
    # Times mean little on a shared machine: the load average says how shared it was.
    result = {"machine": platform.machine(), "python": platform.python_version(), "cpus": torch.get_num_threads(),
              "load_average": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
