"""Where the input pipeline's CPU goes: per image, and per process with Grain worker processes.

    python bench/data_workers.py                         # per-process CPU split, 1 core and 2 workers
    python bench/data_workers.py --parts                 # CPU ms per image of each preprocessing piece
    PYTHONPATH=/path/to/older/checkout python bench/data_workers.py   # the same split for other code

The split runs one epoch of the JSON + PNG pipeline (bench/data.py's data) and reports CPU ms
per sample spent in the timed window by the main process and by each worker (polled with psutil
while they live; start-up excluded), with the consumer reading the pixels as a device transfer
would. It uses only `pipeline.make_dataset`'s long-standing arguments, so it also measures older
checkouts of the library (that is how BENCHMARKS.md's "before" row was taken).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax.data import image as image_lib  # noqa: E402
from llava_jax.data import pipeline, records, synthetic  # noqa: E402
from llava_jax.data.tokenizer import Tokenizer  # noqa: E402


def split(paths, tokenizer, workers: int, crop: int) -> str:
    """One epoch; returns a line with samples/s and CPU ms/sample of the main process and each worker."""
    cfg = image_lib.ImageProcessorConfig(size=crop, crop_size=crop, pad_to_square=True)
    ds = pipeline.make_dataset(paths["stage2"], paths["image_folder"], tokenizer, "vicuna_v1", cfg,
                               num_image_tokens=(crop // 14) ** 2, image_token_index=tokenizer.vocab_size,
                               max_length=2048, batch_size=16, seed=0, num_epochs=1, shard_index=0, shard_count=1,
                               worker_count=workers, read_threads=1)
    it = iter(ds)
    for _ in range(max(1, workers)):  # warm-up: every worker has started
        next(it)
    time.sleep(0.1)
    procs = psutil.Process().children(recursive=True)
    seen, stop, own = {}, threading.Event(), [0.0]

    def read():
        for proc in procs:
            try:
                t = proc.cpu_times()
                seen[proc.pid] = t.user + t.system
            except psutil.Error:  # exited
                pass

    def poll():  # reads the workers while they live; its own CPU is left out of the main process's
        t0 = time.thread_time()
        while not stop.wait(0.05):
            read()
        own[0] = time.thread_time() - t0

    read()
    base = dict(seen)
    thread = threading.Thread(target=poll, daemon=True)
    main0, first, t0 = time.process_time(), it.stats.samples, time.perf_counter()
    thread.start()
    checksum = 0.0
    for batch in it:
        checksum += float(batch["pixel_values"][:, 0, ::7, ::7].sum())  # touch the pages, as a transfer would
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    read()
    main = time.process_time() - main0 - own[0]
    it.close()
    n = it.stats.samples - first
    kids = [seen[p] - base.get(p, 0.0) for p in seen]
    per = " ".join(f"{1000 * k / n:.2f}" for k in kids if k > 0.01 * n / 1000)
    total = 1000 * (main + sum(kids)) / n
    return (f"workers={workers}: {n / elapsed:.1f} samples/s; CPU ms/sample: main {1000 * main / n:.2f}, workers "
            f"[{per}], total {total:.2f}; load {os.getloadavg()[0]:.1f}")


def parts(paths, crop: int, count: int = 150) -> str:
    """CPU ms per image of each piece: decode, geometry, the two normalisations, shared-memory copies."""
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top

    cfg = image_lib.ImageProcessorConfig(size=crop, crop_size=crop, pad_to_square=True)
    table = image_lib.normalization_table(cfg)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    recs = [r for r in records.load_records(paths["stage2"]) if "image" in r][:count]
    t = dict.fromkeys(["decode", "pad+resize+crop", "normalise (float64, as transformers)", "normalise (table)",
                       "shared-memory copy float32", "shared-memory copy uint8"], 0.0)
    clock = time.process_time
    for r in recs:
        a = clock()
        img = image_lib.load_image(os.path.join(paths["image_folder"], r["image"]))
        b = clock()
        u8 = image_lib.preprocess_uint8(img, cfg)
        c = clock()
        x = (u8.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        f32 = (x - mean) / std
        d = clock()
        y = image_lib.normalize(u8, cfg, table)
        e = clock()
        assert np.array_equal(f32, y)
        meta = shared_memory_array.copy_to_shm({"p": f32})
        g = clock()
        shared_memory_array.unlink_shm(meta)
        meta = shared_memory_array.copy_to_shm({"p": u8})
        h = clock()
        shared_memory_array.unlink_shm(meta)
        for key, dt in zip(t, (b - a, c - b, d - c, e - d, g - e, h - g)):
            t[key] += dt
    return "CPU ms per image: " + ", ".join(f"{k} {1000 * v / len(recs):.2f}" for k, v in t.items()) + \
        f"; load {os.getloadavg()[0]:.1f}"


def main(argv=None) -> None:
    """Prints the per-process split (or, with --parts, the per-piece costs)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", action="store_true", help="per-piece CPU per image instead of the process split")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--num-train", type=int, default=384)
    p.add_argument("--crop", type=int, default=336)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "llava_jax_bench_data"))
    args = p.parse_args(argv)
    paths = synthetic.build(args.data_dir, num_train=args.num_train, num_val=0, image_size=480)
    if args.parts:
        print(parts(paths, args.crop))
        return
    tokenizer = Tokenizer(paths["tokenizer"])
    for workers in args.workers:
        print(split(paths, tokenizer, workers, args.crop), flush=True)


if __name__ == "__main__":
    main()
