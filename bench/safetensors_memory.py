"""Peak memory of reading a safetensors checkpoint: our streaming reader against the `safetensors` package.

Why `weights/safetensors_io.py` is ours and not the package: `safe_open` memory-maps the file and the
pages a read touches stay in the process's resident set. Each reader runs in its own process, reads every
tensor of one file, casts it to float32 and transposes it (what conversion does), and reports its peak
RSS (`ru_maxrss`) and time.

    python -m bench.safetensors_memory            # a 512 MiB file in a temporary directory
    python -m bench.safetensors_memory --mib 2048
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

READERS = {
    "ours (weights/safetensors_io.py)": """
from llava_jax.weights.safetensors_io import TensorStore
store = TensorStore([PATH])
for name in store.keys():
    store.get(name).astype("float32").T.copy()
""",
    "safetensors safe_open(framework='numpy')": """
import ml_dtypes  # safe_open's numpy reader needs it for bf16
from safetensors import safe_open
with safe_open(PATH, framework="numpy") as f:
    for name in f.keys():
        f.get_tensor(name).astype("float32").T.copy()
""",
}

# The imports first, so that the figure after them is the reading's own.
MEASURE = """
import resource, sys, time
import ml_dtypes, numpy
from safetensors import safe_open
from llava_jax.weights.safetensors_io import TensorStore
PATH = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
{body}
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t)
"""


def write_file(path: str, mib: int) -> None:
    """A checkpoint-like file: bf16 [4096, 2048] matrices and f32 [2048, 2048] ones, about `mib` MiB."""
    import ml_dtypes
    import numpy as np

    from llava_jax.weights.safetensors_io import save_file

    rng = np.random.default_rng(0)
    tensors, size, i = {}, 0, 0
    while size < mib * 2**20:
        if i % 4 == 3:
            t = rng.standard_normal((2048, 2048), dtype=np.float32)
        else:
            t = rng.standard_normal((4096, 2048), dtype=np.float32).astype(ml_dtypes.bfloat16)
        tensors[f"layers.{i}.weight"] = t
        size += t.nbytes
        i += 1
    save_file(tensors.items(), path)


def main(argv: list[str] | None = None) -> int:
    """Writes the file, runs each reader in a fresh process, prints a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="size of the test file")
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        # Written by a child: Linux keeps a process's peak RSS across fork and exec, so a parent that had
        # held the tensors would lend its peak to every reader it starts.
        subprocess.run([sys.executable, "-c", f"from bench.safetensors_memory import write_file; "
                        f"write_file({path!r}, {args.mib})"], cwd=root, check=True)
        print(f"file: {os.path.getsize(path) / 2**20:.0f} MiB")
        print("| reader | peak RSS (MiB) | after the imports (MiB) | time (s) |\n|---|---|---|---|")
        for name, body in READERS.items():
            code = MEASURE.format(body=body.strip())
            r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=root)
            if r.returncode:
                print(f"| {name} | failed: {r.stderr.strip().splitlines()[-1]} | | |")
                continue
            base, rss, seconds = map(float, r.stdout.split())
            print(f"| {name} | {rss:.0f} | {base:.0f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
