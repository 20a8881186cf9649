"""Captioning client throughput against its ceiling, measured in one run on this machine.

    .venv/bin/python bench/caption.py [--latency-s 0.2] [--seconds 4] [--in-flight 64,256]

Starts the local endpoint (`lensforge serve-captioner` equivalent) in a child process with a fixed latency, so the
client's CPU time is its own, then sends chat.completions requests (one small scene image, the `short` preset)
through the pipeline's own client code (`captioning.client`: AsyncOpenAI on aiohttp, our retry/rate control):
  - requests/s at N in flight against the ceiling N / latency (goal ≥ 0.8 at 64 in flight);
  - client CPU milliseconds per request: time.process_time() of this process over the timed window / requests
    (goal ≤ 2 ms); the endpoint's CPU is in the child and not counted;
  - a naive loop for contrast: the synchronous openai client, one request at a time.
On a shared 2-core machine the endpoint competes with the client for the cores: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from captioning.client import Sender, make_client  # noqa: E402
from captioning.config import CaptionConfig  # noqa: E402
from captioning.presets import PRESETS  # noqa: E402
from captioning.request import build_request  # noqa: E402
from bench.report import emit, row  # noqa: E402

SETTLE_S = 1.0  # seconds of a run before req/s is counted (connections, AIMD, the first wave of answers)
SERVER = "from captioning.endpoint import serve; import sys; serve('127.0.0.1', int(sys.argv[1]), latency_s={})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER.format(latency_s), str(port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"endpoint exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=1).read()
            return proc, base_url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("endpoint did not start within 60 s")


def request_body(cfg: CaptionConfig) -> dict:
    """One `short` request with a small scene image: the endpoint's parse stays cheap; the client's work per
    request (JSON, HTTP, parsing the answer) is what is measured."""
    from captioning.images import prepare
    from scenes import random_scene, render

    buf = io.BytesIO()
    render(random_scene(random.Random(0), word_prob=0.0), size=64).save(buf, "JPEG", quality=85)
    image = prepare(buf.getvalue(), cfg.max_side, cfg.jpeg_quality)
    return build_request("bench", image.data_url, ["short"], PRESETS, cfg)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def concurrent(cfg: CaptionConfig, body: dict, in_flight: int, seconds: float, latency_s: float,
                     server_pid: int) -> dict:
    """Keep `in_flight` requests going; req/s is counted over `seconds` of steady state (completions after a
    settling second, so neither the ramp-up nor the tail biases it), CPU per request over the whole timed run.
    The first round opens the connections and is not timed."""
    client = make_client(cfg, "sk-local")
    sender = Sender(client, cfg, "sk-local")
    done: list[float] = []  # completion times
    seconds_each: list[float] = []  # request times as the client saw them
    errors = 0

    async def worker(deadline: float) -> None:
        nonlocal errors
        while True:
            answer = await sender.send(body, "bench")
            errors += answer.body is None
            seconds_each.append(answer.latency_s)
            done.append(time.perf_counter())
            if done[-1] >= deadline:
                return

    async with client:
        await asyncio.gather(*(worker(0.0) for _ in range(in_flight)))  # warm-up: one request each
        done.clear()
        seconds_each.clear()
        errors = 0
        cpu, server_cpu, start = time.process_time(), cpu_seconds(server_pid), time.perf_counter()
        window = (start + SETTLE_S, start + SETTLE_S + seconds)
        await asyncio.gather(*(worker(window[1]) for _ in range(in_flight)))
        cpu, server_cpu = time.process_time() - cpu, cpu_seconds(server_pid) - server_cpu
    n = len(done)
    steady = sum(window[0] <= t < window[1] for t in done)
    return {"rps": steady / seconds, "limit": in_flight / latency_s, "cpu_ms": 1000 * cpu / n,
            "server_cpu_ms": 1000 * server_cpu / n, "errors": errors, "n": n,
            "request_ms": 1000 * sum(seconds_each) / n}


def report(label: str, r: dict, goal: bool) -> None:
    print(f"{label}: {r['rps']:7.1f} req/s of a {r['limit']:.0f} req/s ceiling (in_flight / latency) = "
          f"{r['rps'] / r['limit']:.2f}{' (goal >= 0.8)' if goal else ''}; client CPU {r['cpu_ms']:.2f} ms/request "
          f"(goal <= 2), endpoint {r['server_cpu_ms']:.2f}; mean request {r['request_ms']:.0f} ms; {r['n']} requests, "
          f"{r['errors']} errors", flush=True)


def sequential(base_url: str, body: dict, n: int) -> float:
    client = openai.OpenAI(base_url=base_url, api_key="sk-local", max_retries=0)
    client.chat.completions.create(**body)  # warm-up
    wall = time.perf_counter()
    for _ in range(n):
        client.chat.completions.create(**body)
    return n / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per in-flight setting")
    parser.add_argument("--in-flight", default="64,256")
    parser.add_argument("--sequential", type=int, default=10, help="requests of the naive loop")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    proc, base_url = start_server(args.latency_s)
    results = {}
    try:
        levels = [int(x) for x in args.in_flight.split(",")]
        cfg = CaptionConfig(base_url=base_url, model="gpt-4.1-mini", variants=["short"], max_side=64,
                            concurrency=max(levels), timeout_s=60)
        body = request_body(cfg)
        for level in levels:
            r = asyncio.run(concurrent(cfg.model_copy(update={"concurrency": level}), body, level, args.seconds,
                                       args.latency_s, proc.pid))
            results[f"in_flight_{level}"] = r
            report(f"{level:3d} in flight", r, level == 64)
        seq = sequential(base_url, body, args.sequential)
        results["sequential_rps"] = seq
        print(f"naive loop (sync client, 1 at a time): {seq:.1f} req/s of a {1 / args.latency_s:.0f} req/s ceiling; "
              f"64 in flight is {results.get('in_flight_64', {}).get('rps', float('nan')) / seq:.0f}x faster")
        emit([row("caption", f"requests/s at {n} in flight, {args.latency_s:g} s endpoint latency", r["rps"], "req/s",
                  peer=r["limit"], peer_name=f"ceiling {n} / {args.latency_s:g} s", goal=">= 0.8" if n == 64 else "")
              for n, r in ((n, results[f"in_flight_{n}"]) for n in levels)]
             + [row("caption", f"client CPU per request at {n} in flight (openai client on aiohttp)",
                    results[f"in_flight_{n}"]["cpu_ms"], "ms", goal="<= 2", goal_of="value") for n in levels]
             + [row("caption", "naive loop (sync client, 1 at a time)", seq, "req/s", peer=1 / args.latency_s,
                    peer_name=f"ceiling 1 / {args.latency_s:g} s")])
    finally:
        proc.terminate()
        proc.wait(10)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(machine: {os.cpu_count()} cores shared with the endpoint, load average {load:.1f} at the end; "
          f"latency {args.latency_s:g} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
