"""Time per training step spent waiting on data: prefetch against none, local disk and S3.

Two ranks (local processes, gloo, DDP) train the GPT workload on the corpus that
`orchestrator data prepare` makes (the standard library's source, byte tokens, 4 MB), reading
it through `TokenSource`, in each of:

  local / prefetch 0    every batch read from local Parquet shards when the step asks for it
  local / prefetch 2    two batches read ahead by the source's background thread
  s3 / prefetch 0|2     the same shards on an S3 server (moto, on 127.0.0.1, in this process)

Wait = the time `next_batch()` blocked the training thread; step = the whole step (data, forward,
backward, optimizer, the loss all-reduce). The figure is sum(wait) / sum(step) after a warm-up,
per rank, and the worse rank counts. Configurations run interleaved, in rounds, so that the
machine's drift hits all of them alike.

    python bench/data.py              # about 3 minutes here
    python bench/data.py --steps 10   # a quick look

Writes bench/results/data.json and prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 3
MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "seq_len": 256, "batch_size": 16,
         "vocab_size": 257}


def bench_rank(rank: int, world: int, groups, data_url: str, prefetch: int, steps: int):
    import torch

    from orchestrator.data import TokenDataset, TokenSource
    from workloads.common import global_mean
    from workloads.gpt import GPTArgs, build

    torch.set_num_threads(1)  # two ranks on two cores
    a = GPTArgs(steps=steps, **MODEL)
    model, state = build(a, torch.device("cpu"))
    source = TokenSource(TokenDataset(data_url), seq_len=a.seq_len, global_batch=a.batch_size,
                         rank=rank, world_size=world, seed=0, prefetch=prefetch,
                         vocab_size=a.vocab_size)
    waits, step_s = [], []
    for _ in range(steps):
        t0, w0 = time.perf_counter(), source.wait_s
        batch = source.next_batch()
        loss = model(batch.inputs, batch.targets)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        global_mean(loss)
        step_s.append(time.perf_counter() - t0)
        waits.append(source.wait_s - w0)
    source.close()
    return {"wait_s": waits, "step_s": step_s, "retries": source.dataset.retries}


def summarize(ranks: list[dict]) -> dict:
    per_rank = []
    for r in ranks:
        wait, step = r["wait_s"][WARMUP_STEPS:], r["step_s"][WARMUP_STEPS:]
        per_rank.append({"wait_fraction": sum(wait) / sum(step),
                         "median_wait_ms": 1000 * statistics.median(wait),
                         "median_step_ms": 1000 * statistics.median(step),
                         "first_wait_ms": 1000 * r["wait_s"][0]})
    worst = max(per_rank, key=lambda x: x["wait_fraction"])
    return {**worst, "ranks": per_rank, "raw": ranks}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> str:
    """moto's S3 server on loopback, and the usual AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}"


def run(args: argparse.Namespace) -> dict:
    import logging

    from orchestrator.data.prepare import prepare
    from orchestrator.local_gang import run_gang

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    urls = {"local": str(tmp / "corpus")}
    if not args.local_only:
        urls["s3"] = start_s3() + "/corpus"
    for url in urls.values():
        manifest = prepare(url, max_bytes=args.max_bytes)
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    configs = [(where, p) for where in urls for p in (0, 2)]
    raw: dict[str, list] = {f"{w}/prefetch{p}": [] for w, p in configs}
    for round_ in range(args.rounds):
        for where, prefetch in configs:
            key = f"{where}/prefetch{prefetch}"
            ranks = run_gang(bench_rank, 2, urls[where], prefetch, args.steps,
                             out_dir=str(tmp), env=env)
            raw[key].append(summarize(ranks))
            print(f"round {round_ + 1}: {key}: wait {raw[key][-1]['wait_fraction']:.2%} of "
                  f"the step", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "model": MODEL, "steps": args.steps, "warmup_steps": WARMUP_STEPS,
               "rounds": args.rounds,
               "corpus": {"rows": manifest.total_rows, "chunk_tokens": manifest.chunk_tokens,
                          "shards": len(manifest.shards), "bytes": manifest.total_bytes},
               "configs": {}}
    for key, runs in raw.items():
        results["configs"][key] = {
            "wait_fraction": statistics.median(r["wait_fraction"] for r in runs),
            "median_wait_ms": statistics.median(r["median_wait_ms"] for r in runs),
            "median_step_ms": statistics.median(r["median_step_ms"] for r in runs),
            "first_wait_ms": statistics.median(r["first_wait_ms"] for r in runs),
            "runs": runs}
    return results


def table(results: dict) -> str:
    lines = ["| data | prefetch | wait / step time | median wait | median step | first batch |",
             "|---|---|---|---|---|---|"]
    for key, c in results["configs"].items():
        where, prefetch = key.split("/prefetch")
        lines.append(f"| {where} | {prefetch} | {c['wait_fraction']:.2%} | "
                     f"{c['median_wait_ms']:.1f} ms | {c['median_step_ms']:.0f} ms | "
                     f"{c['first_wait_ms']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--local-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    parser.add_argument("--table", action="store_true",
                        help="print the table of the results already in --out; run nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
