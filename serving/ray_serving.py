"""More than one machine, with Ray: the service as a Ray Serve deployment (replicas, autoscaling), and batch
inference over a folder or a Hugging Face `datasets` split with Ray Data. `pip install -e '.[ray]'`.

    python -m serving.ray_serving serve --checkpoint runs/synthetic/best --replicas 2     # :8000, as serve.py
    python -m serving.ray_serving serve --checkpoint DIR --autoscale 1 8 --address auto  # on a running cluster
    python -m serving.ray_serving batch --checkpoint DIR --images photos/ --out masks/ --workers 4

When to pick which: serve.py is one process on one machine, with nothing to set up; its dynamic batching
fills one model. Ray Serve runs the same contract (GET /health, GET /metadata, POST /predict: the same
answers, byte for byte) on as many replicas as there are CPUs or GPUs in a cluster, adds and removes
replicas with the load (`--autoscale MIN MAX`: Ray Serve's autoscaling_config, by the requests waiting per
replica), and batches each replica's requests with `@serve.batch`. Ray Data is for a set of images known in
advance (a folder, a dataset split): no HTTP at all, the images read, segmented and written by a pool of
model actors (`map_batches`), each holding the model once; the masks are infer.py's `<stem>_mask.png`.

Every process Ray starts imports this checkout: on one machine through PYTHONPATH; on a cluster (--address)
Ray ships the checkout as the job's working_dir (without runs/, .git/ and other outputs).
"""

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_WITHOUT = ["runs/", ".git/", "predictions/", "exported/", "*.onnx", "*.pt", "*.safetensors"]


def runtime_env(address: str | None) -> dict:
    """How Ray's processes import this project: PYTHONPATH on this machine; the checkout shipped to a cluster."""
    if address in (None, "local"):
        return {"env_vars": {"PYTHONPATH": str(ROOT)}}
    return {"working_dir": str(ROOT), "excludes": SHIPPED_WITHOUT}


# ---- Ray Serve --------------------------------------------------------------------------------------------

def deployment(source: str, *, max_batch: int = 8, max_wait_ms: float = 10.0, replicas: int = 1,
               autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0,
               limits=None, segmenter_options: dict | None = None):
    """The Ray Serve application: `serve.run(deployment(...))`. autoscale (min, max) replaces `replicas`."""
    from ray import serve

    from .protocol import Limits

    limits = limits or Limits()
    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": 2 * max_batch}}
               if autoscale else {"num_replicas": replicas})

    @serve.deployment(ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                      max_ongoing_requests=4 * max_batch, **scaling)
    class SegFormerService:
        """One replica: the model once, its requests batched by @serve.batch."""

        def __init__(self):
            from .segmenter import Segmenter
            self.segmenter = Segmenter.load(source, **(segmenter_options or {}))

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1000)
        async def predict_batch(self, requests: list[tuple[str, Image.Image]]) -> list:
            """The (mode, image) requests gathered: each mode's images in one call; a failing call retried one
            image at a time, so that a failing request fails alone (its exception is its result)."""
            results = [None] * len(requests)
            for mode in dict.fromkeys(mode for mode, _ in requests):
                indices = [i for i, (m, _) in enumerate(requests) if m == mode]
                try:
                    predictions = await asyncio.to_thread(self.segmenter.predict, mode,
                                                          [requests[i][1] for i in indices])
                except Exception:
                    predictions = [await asyncio.to_thread(alone, self.segmenter, mode, requests[i][1])
                                   for i in indices]
                for i, prediction in zip(indices, predictions):
                    results[i] = prediction
            return results

        async def submit(self, mode: str, image: Image.Image):
            result = await self.predict_batch((mode, image))
            if isinstance(result, Exception):
                raise result
            return result

        async def __call__(self, request):
            from .http import answer_predict, error
            from starlette.responses import JSONResponse
            route = (request.method, request.url.path.rstrip("/") or "/")
            if route == ("GET", "/health"):
                return JSONResponse({"status": "ok"})
            if route == ("GET", "/metadata"):
                return JSONResponse({**self.segmenter.metadata(), "limits": limits.describe(),
                                     "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms,
                                                  "replicas": autoscale or replicas, "server": "Ray Serve"}})
            if route == ("POST", "/predict"):
                return await answer_predict(request, self.segmenter, limits, self.submit)
            return error(404 if route[1] not in ("/health", "/metadata", "/predict") else 405,
                         f"{request.method} {request.url.path}: the service has GET /health, GET /metadata and "
                         f"POST /predict")

    return SegFormerService.bind()


def alone(segmenter, mode: str, image):
    try:
        return segmenter.predict(mode, [image])[0]
    except Exception as e:  # out of memory, ...: this request's answer
        return e


# ---- Ray Data ---------------------------------------------------------------------------------------------

class MaskWriter:
    """A Ray Data actor: the model once; each batch of (bytes, path) rows decoded as infer.py decodes a file,
    segmented, and its masks written under `out` by the rows' paths relative to `root`."""

    def __init__(self, source: str, out: str, root: str | None, segmenter_options: dict):
        from .segmenter import Segmenter
        self.segmenter = Segmenter.load(source, **segmenter_options)
        self.out, self.root = Path(out), Path(root) if root else None
        self.mode = self.segmenter.default_mode

    def __call__(self, batch: dict) -> dict:
        from segformer.files import atomic_write
        from segformer.images import decode, to_rgb
        from segformer.visual import label_map_image
        names, images, problems = [], [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            names.append(str(path))
            try:
                images.append(to_rgb(decode(bytes(data), str(path))))
                problems.append("")
            except Exception as e:  # the DataError names the file; the others go on
                images.append(None)
                problems.append(str(e).splitlines()[0])
        good = [i for i, image in enumerate(images) if image is not None]
        predictions = self.segmenter.predict(self.mode, [images[i] for i in good]) if good else []
        classes = [""] * len(names)
        for i, prediction in zip(good, predictions):
            label_map = prediction.label_map.numpy()
            target = self.out / self.relative(names[i])
            mask = label_map_image(label_map, len(self.segmenter.names))
            atomic_write(target.with_name(target.stem + "_mask.png"), lambda tmp, m=mask: m.save(tmp, format="PNG"))
            classes[i] = " ".join(self.segmenter.names[int(c)] for c in np.unique(label_map))
        return {"path": np.array(names), "classes": np.array(classes), "error": np.array(problems)}

    def relative(self, path: str) -> Path:
        path = Path(path)
        if self.root is not None:
            try:
                return path.relative_to(self.root)
            except ValueError:
                pass
        return Path(path.name)


def batch_inference(source: str, out: str, *, images: str | None = None, dataset=None, image_column: str = "image",
                    batch_size: int = 8, workers: int = 1, cpus_per_worker: float = 1.0,
                    segmenter_options: dict | None = None):
    """Masks of every image of a folder (or of a `datasets` split) written under `out`; the rows (path,
    classes, error) of what was done. Ray must be initialised."""
    import ray
    from segformer.images import IMAGE_SUFFIXES

    from .protocol import png
    if (images is None) == (dataset is None):
        raise ValueError("give images (a folder) or dataset (a datasets split), one of them")
    root = None
    if images is not None:
        root = str(Path(images).resolve())
        data = ray.data.read_binary_files(root, include_paths=True,
                                          file_extensions=[s.lstrip(".") for s in IMAGE_SUFFIXES])
    else:
        data = ray.data.from_items([{"bytes": png(row[image_column]), "path": f"{i:06d}.png"}
                                    for i, row in enumerate(dataset)])
    results = data.map_batches(MaskWriter, batch_size=batch_size, concurrency=workers, num_cpus=cpus_per_worker,
                               fn_constructor_args=(source, str(out), root, segmenter_options or {}))
    return results.take_all()


# ---- the command line ------------------------------------------------------------------------------------

def get_args(argv=None):
    from segformer.cli import bounded
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a Ray cluster to join ('auto': the one this machine belongs to; default: a "
                                     "new local Ray started here, stopped on exit)")
    p.add_argument("--object-store-mb", type=bounded(int, 75, 2**24),
                   help="the local Ray's object store, in MiB (default: Ray's, 30%% of the memory)")
    commands = p.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="the HTTP service on Ray Serve")
    batch = commands.add_parser("batch", help="masks of a folder or a datasets split, with Ray Data")
    for command in (serve, batch):
        command.add_argument("--checkpoint", default="runs/synthetic/best",
                             help="checkpoint directory, weights file, hub id or exported model")
        command.add_argument("--max-batch", type=bounded(int, 1, 256), default=8, help="images in one forward pass")
        command.add_argument("--cpus", type=bounded(float, 0.1, 1024), default=1.0,
                             help="CPUs of each replica (serve) or worker (batch)")
        command.add_argument("--gpus", type=bounded(float, 0, 64), default=0, help="GPUs of each")
    serve.add_argument("--host", default="127.0.0.1", help="address Ray Serve's proxy listens on")
    serve.add_argument("--port", type=bounded(int, 1, 65535), default=8000)
    serve.add_argument("--max-wait-ms", type=bounded(float, 0.0, 10_000.0), default=10.0,
                       help="@serve.batch's batch_wait_timeout_s, in ms")
    serve.add_argument("--replicas", type=bounded(int, 1, 10_000), default=1, help="replicas (without --autoscale)")
    serve.add_argument("--autoscale", type=bounded(int, 0, 10_000), nargs=2, metavar=("MIN", "MAX"),
                       help="let Ray Serve keep between MIN and MAX replicas, by the requests waiting")
    batch.add_argument("--images", help="a folder of images (walked recursively)")
    batch.add_argument("--dataset", help="a Hugging Face dataset (name or local folder), with --split")
    batch.add_argument("--split", default="validation", help="its split")
    batch.add_argument("--image-column", default="image", help="its image column")
    batch.add_argument("--out", default="predictions", help="where the masks go")
    batch.add_argument("--workers", type=bounded(int, 1, 10_000), default=1, help="model actors")
    return p.parse_args(argv)


def main(args) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        from segformer.errors import ConfigError
        raise ConfigError("Ray is not installed: pip install -e '.[ray]'") from None
    if args.object_store_mb and args.address:
        print("error: --object-store-mb sizes a local Ray; a cluster (--address) has its own", file=sys.stderr)
        return 2
    ray.init(address=args.address or "local", runtime_env=runtime_env(args.address), include_dashboard=False,
             log_to_driver=False, object_store_memory=args.object_store_mb and args.object_store_mb * 2**20)
    options = {"device": "cuda" if args.gpus else "cpu"}
    if args.command == "serve":
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(args.checkpoint, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             replicas=args.replicas, autoscale=tuple(args.autoscale) if args.autoscale else None,
                             cpus_per_replica=args.cpus, gpus_per_replica=args.gpus, segmenter_options=options))
        print(f"Ray Serve: {args.checkpoint} on http://{args.host}:{args.port}", flush=True)  # the replicas are up
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        serve.shutdown()  # the deployment, then (a local Ray) the instance started above
        ray.shutdown()
        return 0
    if not args.images and not args.dataset:
        print("error: batch needs --images FOLDER or --dataset NAME", file=sys.stderr)
        return 2
    dataset = None
    if args.dataset:
        import datasets
        dataset = datasets.load_dataset(args.dataset, split=args.split)
    rows = batch_inference(args.checkpoint, args.out, images=args.images, dataset=dataset,
                           image_column=args.image_column, batch_size=args.max_batch, workers=args.workers,
                           cpus_per_worker=args.cpus, segmenter_options=options)
    failed = [row for row in rows if row["error"]]
    print(f"{len(rows) - len(failed)} image(s) segmented into {args.out}/" + (f"; {len(failed)} failed:" if failed
                                                                             else ""))
    for row in failed:
        print(f"  {row['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    from segformer.cli import run_main
    sys.exit(run_main(lambda: main(get_args())))
