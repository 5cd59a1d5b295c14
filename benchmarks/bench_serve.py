"""Load test of serve.py: throughput and latency at 1, 4 and 16 concurrent clients, dynamic batching on and
off, and the server's resident memory over 2,000 requests.

    python benchmarks/bench_serve.py                                   # runs/synthetic/best, the ADE sample photos
    python benchmarks/bench_serve.py --checkpoint DIR --images photos/ --requests 200 --threads 2

Each setting starts `serve.py` in its own process on a free loopback port, warms it up, then sends a bounded
number of requests (each client, an asyncio task of httpx's AsyncClient, sends its next request when its
last one is answered) and stops the server. Latency is measured from the client's send to the whole answer
(the JSON segments, with their masks); throughput is answered requests per second of wall time. The memory
run sends --memory-requests requests at the highest concurrency and samples the server's VmRSS
(/proc/<pid>/status) every tenth of them: a service whose memory grows under load leaks.

Client and server share the machine's cores: on a small machine the figures are the service's under a
client that takes some of its CPU, which is what `--threads` of the server is for.
"""

import argparse
import asyncio
import io
import itertools
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segformer.cli import bounded  # noqa: E402
from segformer.images import is_image_file  # noqa: E402

SAMPLES = ROOT.parent / "shared" / "data" / "ade20k-samples" / "images"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/synthetic/best", help="what serve.py serves")
    p.add_argument("--images", help=f"a folder of photos to send (default: {SAMPLES} where it exists, else "
                                    f"synthetic scenes)")
    p.add_argument("--clients", type=bounded(int, 1, 256), nargs="+", default=[1, 4, 16],
                   help="concurrent clients, one row each")
    p.add_argument("--requests", type=bounded(int, 1, 100_000), default=160, help="requests per row")
    p.add_argument("--max-seconds", type=bounded(float, 1.0, 3600.0), default=120.0,
                   help="a row stops sending after this long, whatever is left of --requests")
    p.add_argument("--memory-requests", type=bounded(int, 0, 1_000_000), default=2000,
                   help="requests of the memory run (0: none)")
    p.add_argument("--max-batch", type=bounded(int, 2, 256), default=8, help="the server's batch with batching on")
    p.add_argument("--max-wait-ms", type=bounded(float, 0.0, 1000.0), default=10.0, help="its wait time")
    p.add_argument("--threads", type=bounded(int, 1, 1024), help="the server's CPU threads")
    p.add_argument("--out", help="also write the table (markdown) here")
    return p.parse_args(argv)


def photos(folder: str | None) -> list[bytes]:
    if folder is None and SAMPLES.is_dir():
        folder = SAMPLES
    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if is_image_file(p))
        if not files:
            sys.exit(f"error: --images {folder}: no images there")
        return [p.read_bytes() for p in files]
    from data.synthetic import SyntheticScenes
    scenes, out = SyntheticScenes("test", length=8), []
    for i in range(8):
        buffer = io.BytesIO()
        scenes[i][0].save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class Server:
    """serve.py in its own process, at a free loopback port; stopped (SIGTERM) on leaving."""

    def __init__(self, args, *, max_batch: int):
        command = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", args.checkpoint, "--port", "0",
                   "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if " on http://" not in line:
            self.process.wait(30)
            sys.exit(f"error: serve.py did not start (exit {self.process.returncode})")
        self.url = line.strip().rsplit(" ", 1)[-1]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(60)


async def load(url: str, bodies: list[bytes], *, clients: int, requests: int, max_seconds: float,
               every=None) -> dict:
    """`clients` tasks sending `requests` in all; latencies (s), wall time, failures."""
    import httpx
    queue = itertools.count()
    latencies, failures = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http):
        nonlocal failures
        while (i := next(queue)) < requests and time.perf_counter() < deadline:
            start = time.perf_counter()
            answer = await http.post("/predict", content=bodies[i % len(bodies)],
                                     headers={"Content-Type": "image/jpeg"})
            latencies.append(time.perf_counter() - start)
            failures += answer.status_code != 200
            if every is not None and i % every[0] == 0:
                every[1](i)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for body in bodies[:2]:  # warm-up
            (await http.post("/predict", content=body)).raise_for_status()
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
        stats = (await http.get("/metadata")).json()["batching"]
    return {"latencies": latencies, "wall": wall, "failures": failures, "batches": stats}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(batching: str, clients: int, result: dict) -> str:
    ms = [t * 1000 for t in result["latencies"]]
    mean_batch = result["batches"]["requests"] / max(result["batches"]["batches"], 1)
    return (f"| {batching} | {clients} | {len(ms)} | {len(ms) / result['wall']:.1f} | {percentile(ms, 50):.0f} | "
            f"{percentile(ms, 95):.0f} | {percentile(ms, 99):.0f} | {mean_batch:.1f} | {result['failures']} |")


def main(args) -> int:
    bodies = photos(args.images)
    lines = ["| batching | clients | requests | requests/s | p50 ms | p95 ms | p99 ms | mean batch | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    print(f"{len(bodies)} photos, {args.requests} requests a row, serve.py --checkpoint {args.checkpoint}"
          f"{f' --threads {args.threads}' if args.threads else ''}", flush=True)
    for clients in args.clients:  # on and off side by side for each row: a drifting machine slows both alike
        for batching, max_batch in ((f"on ({args.max_batch}, {args.max_wait_ms:g} ms)", args.max_batch),
                                    ("off", 1)):
            with Server(args, max_batch=max_batch) as server:
                result = asyncio.run(load(server.url, bodies, clients=clients, requests=args.requests,
                                          max_seconds=args.max_seconds))
            lines.append(row(batching, clients, result))
            print(lines[-1], flush=True)
    memory = ""
    if args.memory_requests:
        clients = max(args.clients)
        with Server(args, max_batch=args.max_batch) as server:
            samples = []
            every = (max(1, args.memory_requests // 10), lambda i: samples.append((i, server.rss_mb())))
            result = asyncio.run(load(server.url, bodies, clients=clients, requests=args.memory_requests,
                                      max_seconds=max(args.max_seconds, 3600), every=every))
            samples.append((args.memory_requests, server.rss_mb()))
        settled = [mb for i, mb in samples if i >= args.memory_requests // 5]  # after the first fifth: warm
        memory = (f"server memory over {len(result['latencies'])} requests ({clients} clients, batching on, "
                  f"{result['failures']} failed): VmRSS {samples[0][1]:.0f} MB after the first, "
                  f"{min(settled):.0f}..{max(settled):.0f} MB from request {args.memory_requests // 5} on, "
                  f"{samples[-1][1]:.0f} MB at the end")
        print(memory)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + ("\n\n" + memory if memory else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
