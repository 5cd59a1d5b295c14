"""Serve a SegFormer over HTTP, as the Hugging Face Inference API's image-segmentation task answers.

    python serve.py --checkpoint runs/synthetic/best                      # http://127.0.0.1:8000
    python serve.py --checkpoint exported/model.onnx --threads 2          # an export.py graph, on ONNX Runtime
    python serve.py --checkpoint ov/model.xml --threads 2                 # on OpenVINO (fp32, bf16 or int8)
    curl --data-binary @photo.jpg localhost:8000/predict                  # [{"label", "score", "mask"}, ...]
    curl --data-binary @photo.jpg -H 'Accept: image/png' localhost:8000/predict -o mask.png   # the class ids
    curl -F image=@photo.jpg 'localhost:8000/predict?mode=slide&output=overlay' -o overlay.png

Routes: GET /health (200 once the model answers), GET /metadata (classes, input size, runtime, device,
batching, limits), POST /predict (the image as the body, or a multipart field `image`; query options mode,
output, alpha: serving/protocol.py). The label maps are infer.py's for the same checkpoint, image and mode.

Concurrent requests are batched (serving/batcher.py): up to --max-batch images within --max-wait-ms of the
first run as one forward pass. --max-batch 1 turns batching off. A bad request is a 4xx with
{"error": "<one line>"}; SIGTERM or Ctrl-C stops taking connections, answers the requests in flight, then
exits. The server listens on --host (loopback unless you say otherwise).
"""

import argparse
import logging
import socket
import sys

from segformer.cli import SIZE_RANGE, bounded, run_main
from segformer.errors import ConfigError

DEFAULT_CHECKPOINT = "runs/synthetic/best"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help=f"checkpoint directory, weights file or hub id, or an exported model "
                                             f"(model.onnx, model.xml, model.pt2 with --trust-code, model.pte) (default: {DEFAULT_CHECKPOINT}, what train.py writes)")
    source.add_argument("--onnx", help="an ONNX graph written by export.py (as --checkpoint FILE.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port (0: any free one; it is printed)")
    p.add_argument("--mode", choices=["resize", "aspect", "slide"], default="resize",
                   help="the inference mode of requests that name none (?mode=)")
    p.add_argument("--size", type=bounded(int, *SIZE_RANGE),
                   help="model input size (default: the checkpoint's preprocessor_config.json, else 512)")
    p.add_argument("--max-batch", type=bounded(int, 1, 256), default=8,
                   help="most images in one forward pass (1: no batching)")
    p.add_argument("--max-wait-ms", type=bounded(float, 0.0, 10_000.0), default=10.0,
                   help="how long a batch waits for more requests after its first one arrived")
    p.add_argument("--max-queue", type=bounded(int, 1, 1_000_000), default=256,
                   help="requests waiting beyond this are refused with 503 (try again later)")
    p.add_argument("--max-body-mb", type=bounded(float, 0.001, 4096.0), default=20.0,
                   help="largest request body, in MB (413 beyond)")
    p.add_argument("--max-megapixels", type=bounded(float, 0.001, 1000.0), default=50.0,
                   help="largest image, in millions of pixels, read from its header before decoding (413 beyond)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast dtype")
    p.add_argument("--threads", type=bounded(int, 1, 1024), help="CPU threads of the model (default: PyTorch's)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPUs)")
    p.add_argument("--grace-s", type=bounded(float, 0.0, 3600.0), default=30.0,
                   help="on SIGTERM, how long requests in flight may take before the server stops anyway")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return p.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before uvicorn starts, so that --port 0's real port can be printed (and a taken port is one line);
    a client that connects before the warm-up is over waits for it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog from now on, until the model is ready to answer
    except OSError as e:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def serve(args) -> int:
    try:
        import uvicorn

        from serving.http import build_app
    except ImportError as e:
        raise ConfigError(f"serve.py needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from serving.batcher import Batcher
    from serving.protocol import Limits
    from serving.segmenter import Segmenter

    source = args.onnx or args.checkpoint or DEFAULT_CHECKPOINT
    segmenter = Segmenter.load(source, runtime="onnx" if args.onnx else None, trust_code=args.trust_code,
                               threads=args.threads, size=args.size, device=args.device, amp=args.amp,
                               batch_size=args.max_batch, channels_last=args.channels_last, mode=args.mode)
    batcher = Batcher(segmenter.predict, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                      max_queue=args.max_queue)
    limits = Limits(max_bytes=round(args.max_body_mb * 1e6), max_pixels=round(args.max_megapixels * 1e6))
    sock = listening_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    meta = segmenter.metadata()
    print(f"serving {source} ({meta['runtime_name']} on {meta['device']}, {len(meta['id2label'])} classes, "
          f"input {meta['input_size']}, batches of up to {args.max_batch} within {args.max_wait_ms:g} ms) "
          f"on http://{host}:{port}", flush=True)
    config = uvicorn.Config(build_app(segmenter, batcher, limits), log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_s, access_log=args.log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_main(lambda: serve(get_args())))
