"""Serve a LLaVA over HTTP: an OpenAI-compatible chat-completions API with continuous batching.

    python -m llava_jax.serve --model-path DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] \\
        [--api-key KEY] [--served-model-name NAME] [--conv-mode vicuna_v1] [--int8] [--tensor-parallel N] \\
        [--max-images 4] [--max-videos 1] [--num-frames N]

The model is loaded and its programs compiled (`SlotEngine.warmup`) before the port opens, so
`/health` answers 200 as soon as anything answers. Routes and the request semantics: `app.py`.
A model that takes video (LLaVA-OneVision, LLaVA-NeXT-Video) takes `video_url` parts: each video's frames
are sampled (`--num-frames`, default the directory's video processor's `num_frames`, else 32; a shorter
video gives all its frames) and preprocessed with the directory's video settings (`Pipeline.video_config`).
SIGTERM (or Ctrl-C) drains: `/health` and new requests get 503, every running and queued request
is answered in full, then the process exits 0; a second signal exits at once. Bad flags, an address
it cannot listen on or a model directory that cannot be loaded print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

import numpy as np
import PIL.Image
import uvicorn

from llava_jax import cli
from llava_jax.inference.engine import InputError
from llava_jax.inference.flags import EXIT_BAD_INPUT, USER_ERRORS, add_model_flags, load_pipeline
from llava_jax.inference.slots import SlotEngine
from llava_jax.serve.app import create_app

log = logging.getLogger("llava_jax.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m llava_jax.serve", description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests answered at the same time")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per device call between looks at the queue (more: faster, later joins)")
    p.add_argument("--api-key", default=os.environ.get("LLAVA_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LLAVA_JAX_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    p.add_argument("--max-images", type=int, default=4, help="images a request may carry at most")
    p.add_argument("--max-videos", type=int, default=1,
                   help="videos a request may carry at most (models that take video: OneVision, NeXT-Video)")
    p.add_argument("--max-body-mb", type=float, default=20, help="largest request body (413 beyond)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    for flag in ("max_batch", "steps_per_call", "max_images", "max_videos", "num_frames"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535; got {args.port}")
    if args.max_body_mb <= 0:
        p.error("--max-body-mb must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: load, warm up, serve until SIGTERM; returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    try:
        check_address(args.host, args.port)  # before minutes of loading, not after
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pipe = load_pipeline(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    video_config = pipe.video_config
    num_frames = args.num_frames or (video_config.num_frames if video_config is not None else None)
    slots = SlotEngine(pipe.engine, max_batch=args.max_batch, steps_per_call=args.steps_per_call)
    slots.start()
    log.info("compiling (max batch %d)", args.max_batch)
    slots.warmup()  # a text-only prompt
    size = pipe.image_config.crop_size
    slots.warmup(pipe.question("Warm up.", pipe.preprocess([PIL.Image.new("RGB", (size, size))])))  # one image
    if video_config is not None:  # one video of the usual length
        side = video_config.frame_size
        try:
            prompt = pipe.question("Warm up.", videos=[np.zeros((num_frames, side, side, 3), np.float32)])
        except InputError as e:  # longer than the context: every such video will be refused, shorter ones served
            log.warning("a video of %d frames does not fit: %s", num_frames, e)
        else:
            slots.warmup(prompt)
    app = create_app(
        pipe, slots,
        model_name=args.served_model_name or pipe.model_id,
        api_key=args.api_key or None,
        max_images=args.max_images,
        max_videos=args.max_videos,
        num_frames=num_frames,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )

    def drain() -> None:
        app.state.draining = True
        log.info("draining: finishing %s", slots.stats())
        slots.stop(drain=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=None)
    server = DrainingServer(config, drain)
    server.run()
    if server.started:
        return 0
    slots.stop(drain=False)
    return 1  # uvicorn could not start (the port taken, say): it logged why


def check_address(host: str, port: int) -> None:
    """Raise OSError if uvicorn could not listen on host:port (a port in use, an address not of this host)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose first SIGTERM / SIGINT drains the engine before the HTTP server stops.

    uvicorn alone would stop accepting connections, wait for open responses, then re-raise the signal
    (exit status -15). Here the first signal runs `drain` on a thread while the server keeps answering
    (503 to new requests, every running answer to its end), then asks uvicorn to stop; the process
    exits 0. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]):
        super().__init__(config)
        self.drain = drain
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler uvicorn installs (main thread): start draining, or on a second signal, stop."""
        if self.draining:
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        log.info("%s: draining", signal.Signals(sig).name)
        threading.Thread(target=self._drain_then_exit, name="drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        self.drain()
        self.should_exit = True  # uvicorn's main loop polls it


if __name__ == "__main__":
    cli.exit_with(main)
