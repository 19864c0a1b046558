"""A shared CPU: how much a nano training step slows when other jobs run at once, with torch's
OpenMP defaults and with other wait policies (proscale's command: GOMP_SPINCOUNT=1000,
proscale/cpu_policy.py).

Each job is a fresh process running training steps (forward + backward + Mask2Former loss) of
a nano preset on random images, for `--seconds` (at least `--min-steps` steps); it reports its
median step time. For each policy: one job alone, then `--jobs` identical jobs started together.
The slowdown is (median step time with J jobs) / (alone): a machine shared fairly gives J x
(J jobs on the same cores); spinning threads give much more.

    python benchmarks/busy.py                                 # proscale_nano_333, 2 threads per job, 2 jobs
    python benchmarks/busy.py --jobs 3 --threads 2 --seconds 30
    python benchmarks/busy.py --policies torch,spin1k,spin10k,passive,passive-1t   # NAME-1t: 1 thread per job
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES = {
    "torch": {},  # torch's defaults (libgomp spins before sleeping)
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin1k": {"GOMP_SPINCOUNT": "1000"},  # spin briefly, then sleep: proscale's default for its command
}


def child(args) -> None:
    import statistics

    import torch

    import proscale
    from proscale.analysis.benchmark import component_fns

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = proscale.build_model(args.preset, num_classes=8).train()
    h, w = (int(v) for v in args.size.split("x"))
    images = torch.randint(0, 256, (args.batch, 3, h, w)).float()
    step = component_fns(model, images, torch.float32, torch.device("cpu"))["model/train"]
    step()  # warm-up
    times = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end or len(times) < args.min_steps:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "steps": len(times)}))


def run_jobs(n: int, env_extra: dict, args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    env.update(env_extra)
    env["PROSCALE_OMP_POLICY"] = "torch"  # the child sets nothing itself: the policy is what env_extra says
    threads = env.pop("_THREADS", None) or str(args.threads)
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--size", args.size, "--batch",
           str(args.batch), "--threads", threads, "--seconds", str(args.seconds), "--min-steps", str(args.min_steps)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a job failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="proscale_nano_333")
    p.add_argument("--size", default="128x128")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads per job (default: all cores)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seconds", type=float, default=15.0, help="how long each job runs steps")
    p.add_argument("--min-steps", type=int, default=5)
    p.add_argument("--policies", default="torch,spin1k,passive",
                   help="among torch, passive, and NAME-1t / NAME-2t (the policy with that many threads per job)")
    args = p.parse_args()
    if args.child:
        return child(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} at start; {args.preset} {args.size} batch {args.batch}, "
          f"training steps, {args.jobs} jobs at once")
    print("| policy | threads/job | alone s/step | %d at once s/step (each) | slowdown |" % args.jobs)
    print("|---|---:|---:|---:|---:|")
    for name in args.policies.split(","):
        base, _, t = name.partition("-")
        env = dict(POLICIES[base])
        threads = int(t[:-1]) if t else args.threads
        env["_THREADS"] = str(threads)
        alone = run_jobs(1, env, args)[0]["median_s"]
        together = [r["median_s"] for r in run_jobs(args.jobs, dict(env), args)]
        mean = sum(together) / len(together)
        print(f"| {base} | {threads} | {alone:.3f} | {' / '.join(f'{x:.3f}' for x in together)} | {mean / alone:.1f}x |",
              flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at the end")


if __name__ == "__main__":
    main()
