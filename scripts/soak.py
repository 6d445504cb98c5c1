#!/usr/bin/env python3
"""The soak (docs/reliability.md): 10,000 steps of a small model on two MPI workers through
`effnet run` (its in-process coordinator relaunches them), a checkpoint every 100 steps, the
store failing a few requests in a thousand throughout, and a worker SIGKILLed or SIGSTOPped about
every 1,000 steps. While it runs, every 0.5 s: each worker's resident memory and open file
descriptors, the launcher's, and the files under the job directory and the temporary directory.

At the end it checks, and exits 1 when one fails:
- the run finished (exit 0) and survived every fault (each one ended a generation);
- every completed epoch trained each sample exactly once, counting each step's keys from the
  last attempt that trained it (a resumed run redoes the steps after its checkpoint);
- resident memory is flat: each worker process, after its first 10 s, grows less than 32 MiB
  from its first to its last quarter (a new epoch's plan and loader add up to ~20 MiB once), and
  the last processes of each rank sit no more than 16 MiB above its first ones (no leak that
  outlives restarts);
- open files do not grow in a worker's life, and the checkpoint directory holds no more
  checkpoints at the end than its retention keeps;
- no temporary file was left behind.

Writes OUT/soak.csv (the samples), OUT/rss.svg (the memory curve with the faults marked) and
OUT/soak.md (the table in docs/reliability.md comes from it).

Usage: soak.py EFFNET DATA WORK OUT [--steps N] [--read-faults]
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

EFFNET, DATA, WORK, OUT = (os.path.abspath(p) for p in sys.argv[1:5])
STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 10_000
FAULT_EVERY = max(STEPS // 10, 50)
# Seconds between samples: a worker lives ~40 s between faults at ~30 steps/s.
SAMPLE_EVERY = 0.5
KEEP_LAST = 3
# With `writes`, checkpoint writes get store faults too and go through the object-store path
# (retried PUTs), as on S3. `--read-faults` leaves writes alone: checkpoints are then written by
# the local-disk writer (O_DIRECT, crates/effnet-checkpoint/src/local.rs), as in a real job
# whose checkpoints are on a local disk.
READ_FAULTS = "--read-faults" in sys.argv
STORE_FAULTS = "seed=1,error=0.002,throttle=0.002,timeout=0.001,truncate=0.002,slow=0.005,timeout_ms=100,slow_ms=50" + (
    "" if READ_FAULTS else ",writes"
)

JOB = f"""name: soak
description: The reliability soak (scripts/soak.py); not a recipe.
job_dir: {WORK}/job
seed: 1
model: {{phi: -4, input_channels: 1, resolution: 16, classes: 10, batch_norm: pytorch}}
data:
  train: {DATA}/train
  normalization: fashion_mnist
  batch_size: 8
  loader_threads: 1
  log_sample_keys: true
  augmentation: {{crop_scale: [1.0, 1.0], crop_ratio: [1.0, 1.0], flip: 0.5}}
optimizer: {{kind: adamw, lr: 0.002, weight_decay: 0.05}}
training: {{steps: {STEPS}, threads: 1, log_every: 100, ema: {{decay: 0.999}}}}
checkpoint: {{every_steps: 100, keep_last: {KEEP_LAST}, keep_best: 0}}
distributed: {{workers: 2, backend: mpi, max_restarts: 40}}
report: {{enabled: false}}
"""


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def workers(job_yaml):
    """(rank, pid) of the running `effnet worker` processes of this job."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if len(args) > 1 and args[1] == b"worker" and state != "Z" and any(WORK.encode() in a for a in args):
            rank = None
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    for var in f.read().split(b"\0"):
                        if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                            rank = int(var.split(b"=")[1])
            except OSError:
                pass
            found.append((rank, int(entry)))
    return sorted(found, key=lambda w: (w[0] is None, w[0]))


def count_files(root):
    return sum(len(files) for _, _, files in os.walk(root))


def last_step(metrics):
    """The newest step record's step, read from the end of metrics.jsonl."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        if '"type":"step"' in line:
            try:
                return json.loads(line)["step"]
            except ValueError:
                continue
    return 0


def main():
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    job_yaml = os.path.join(WORK, "soak.yaml")
    with open(job_yaml, "w") as f:
        f.write(JOB)
    tmp = tempfile.mkdtemp(prefix="effnet-soak-tmp-")
    env = dict(os.environ, TMPDIR=tmp, EFFNET_STORE_FAULTS=STORE_FAULTS, RUST_LOG="warn")
    log = open(os.path.join(WORK, "run.log"), "w")
    started = time.time()
    run = subprocess.Popen(
        [EFFNET, "run", job_yaml, "--fresh", "--progress", "never"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    metrics = os.path.join(WORK, "job", "metrics.jsonl")
    rng = random.Random(7)
    samples, faults = [], []
    next_fault = FAULT_EVERY + rng.randint(-FAULT_EVERY // 10, FAULT_EVERY // 10)
    stops = 0
    while run.poll() is None:
        now = time.time() - started
        step = last_step(metrics)
        live = workers(job_yaml)
        row = {"t": round(now, 1), "step": step, "launcher_rss": proc_status(run.pid, "VmRSS"),
               "launcher_fds": open_fds(run.pid), "job_files": count_files(os.path.join(WORK, "job")),
               "tmp_files": count_files(tmp)}
        for rank, pid in live:
            if rank in (0, 1):
                row[f"pid{rank}"] = pid
                row[f"rss{rank}"] = proc_status(pid, "VmRSS")
                row[f"fds{rank}"] = open_fds(pid)
        samples.append(row)
        if step >= next_fault and len(live) == 2 and next_fault < STEPS - FAULT_EVERY // 2:
            rank, pid = live[rng.randrange(2)]
            # One fault in five is a stop (a hung process) rather than a kill.
            stop = stops < 2 and rng.random() < 0.2
            stops += stop
            os.kill(pid, signal.SIGSTOP if stop else signal.SIGKILL)
            faults.append({"t": round(now, 1), "step": step, "rank": rank, "signal": "STOP" if stop else "KILL"})
            print(f"[{now:7.1f} s] step {step}: SIG{faults[-1]['signal']} rank {rank}", flush=True)
            next_fault = step + FAULT_EVERY + rng.randint(-FAULT_EVERY // 10, FAULT_EVERY // 10)
        time.sleep(SAMPLE_EVERY)
    wall = time.time() - started
    log.close()
    status = run.returncode
    leftovers = count_files(tmp)
    os.rmdir(tmp) if leftovers == 0 else None
    report(status, wall, samples, faults, leftovers)


def lives(samples):
    """Each worker process's samples: (t, rss, fds) lists by (rank, pid), in time order."""
    by_pid = {}
    for s in samples:
        for rank in (0, 1):
            pid = s.get(f"pid{rank}")
            if pid and s.get(f"rss{rank}"):
                by_pid.setdefault((rank, pid), []).append((s["t"], s[f"rss{rank}"], s.get(f"fds{rank}")))
    return by_pid


def report(status, wall, samples, faults, leftovers):
    failures = []
    if status != 0:
        failures.append(f"the run exited {status} (see {WORK}/run.log)")
    records = []
    with open(os.path.join(WORK, "job", "metrics.jsonl")) as f:
        for line in f:
            records.append(json.loads(line))
    starts = [r for r in records if r["type"] == "start"]
    restarts = len(starts) - 1
    if restarts < len(faults):
        failures.append(f"{len(faults)} faults but only {restarts} restarts")

    # Exactly once per completed epoch: each step's keys from the last attempt that trained it.
    by_step = {}
    for name in os.listdir(os.path.join(WORK, "job")):
        if not name.startswith("samples-rank-"):
            continue
        with open(os.path.join(WORK, "job", name)) as f:
            for line in f:
                value = json.loads(line)
                attempt, step = value["attempt"], value["step"]
                seen = by_step.get(step)
                if seen is None or seen[0] < attempt:
                    by_step[step] = (attempt, list(value["keys"]))
                elif seen[0] == attempt:
                    seen[1].extend(value["keys"])
    epoch_ends = sorted({r["step"] for r in records if r["type"] == "epoch_end"})
    with open(os.path.join(DATA, "train", "_manifest.json")) as f:
        rows = json.load(f).get("rows")
    checked, lost, duplicated = 0, 0, 0
    previous = 0
    for end in epoch_ends:
        # A sample line's step counts the steps done before it; `epoch_end` counts them after.
        keys = [k for step in range(previous, end) for k in by_step.get(step, (0, []))[1]]
        unique = set(keys)
        duplicated += len(keys) - len(unique)
        if rows is not None:
            lost += rows - len(unique)
        checked += 1
        previous = end
    if duplicated or lost:
        failures.append(f"{lost} samples lost and {duplicated} duplicated in {checked} epochs")
    if not epoch_ends:
        failures.append("no epoch completed: the exactly-once check had nothing to check")

    # Memory and files per worker process (each generation's processes are new), from 10 s after
    # its first sample to 2 s before its last: a process starting up or shutting down (the last
    # sample of a finished job once caught one with 6 files open, against 34 in its steady life)
    # says nothing about leaks.
    growth, fd_spread, medians = [], [], {}
    for key, life in lives(samples).items():
        steady = [(rss, fds) for t, rss, fds in life if t - life[0][0] > 10 and life[-1][0] - t > 2]
        if len(steady) < 20:
            continue
        rss = [r for r, _ in steady]
        quarter = len(rss) // 4
        growth.append((statistics.median(rss[-quarter:]) - statistics.median(rss[:quarter])) / 2**20)
        medians.setdefault(key[0], []).append((life[0][0], statistics.median(rss) / 2**20))
        fds = [f for _, f in steady if f]
        fd_spread.append(max(fds) - min(fds))
    worst_growth = max(growth, default=0.0)
    # Across the run: a leak that outlives restarts (state that grows with the step count) shows
    # as later processes sitting higher than earlier ones of the same rank (rank 0, which writes
    # the checkpoints, sits ~15 MiB above rank 1, so ranks are not compared with each other).
    trend = max((statistics.median(m for _, m in sorted(ms)[-3:]) - statistics.median(m for _, m in sorted(ms)[:3])
                 for ms in medians.values() if len(ms) >= 6), default=0.0)
    if not growth:
        failures.append("no worker lived long enough to judge memory")
    if worst_growth > 32:
        failures.append(f"a worker's resident memory grew {worst_growth:.1f} MiB in its life")
    if trend > 16:
        failures.append(f"later workers sit {trend:.1f} MiB higher than the first ones")
    if fd_spread and max(fd_spread) > 8:
        failures.append(f"a worker's open files varied by {max(fd_spread)} in its life")
    checkpoints = os.path.join(WORK, "job", "checkpoints")
    kept = [d for d in os.listdir(checkpoints) if d.startswith("step-")]
    if len(kept) > KEEP_LAST + 1:
        failures.append(f"{len(kept)} checkpoint directories kept, retention is {KEEP_LAST}")
    if leftovers:
        failures.append(f"{leftovers} temporary files left behind")

    peak = max((s.get(f"rss{r}") or 0 for s in samples for r in (0, 1)), default=0) / 2**20
    launcher = [s["launcher_rss"] for s in samples if s.get("launcher_rss")]
    launcher_growth = (launcher[-1] - launcher[len(launcher) // 10]) / 2**20 if len(launcher) > 10 else 0.0

    with open(os.path.join(OUT, "soak.csv"), "w") as f:
        columns = ["t", "step", "pid0", "rss0", "fds0", "pid1", "rss1", "fds1", "launcher_rss", "launcher_fds", "job_files", "tmp_files"]
        f.write(",".join(columns) + "\n")
        for s in samples:
            f.write(",".join("" if s.get(c) is None else str(s[c]) for c in columns) + "\n")
    write_svg(samples, faults, os.path.join(OUT, "rss.svg"))
    last = max((s["step"] for s in samples), default=0)
    lines = [
        f"- command: `{'scripts/soak.sh --read-faults' if READ_FAULTS else 'make soak'}` ({STEPS:,} steps; scripts/soak.py)",
        f"- wall: {wall / 60:.1f} min; exit status {status}; {len(faults)} faults "
        f"({sum(f['signal'] == 'KILL' for f in faults)} SIGKILL, {sum(f['signal'] == 'STOP' for f in faults)} SIGSTOP) "
        f"at steps {', '.join(str(f['step']) for f in faults)}; {restarts} restarts",
        f"- store faults throughout: `{STORE_FAULTS}`"
        + ("; checkpoints written by the local-disk writer" if READ_FAULTS else "; checkpoints written through the object-store path"),
        f"- exactly once: {checked} completed epochs checked, {lost} samples lost, {duplicated} duplicated",
        f"- resident memory per worker process: peak {peak:.0f} MiB; largest growth in one process's life "
        f"{worst_growth:.1f} MiB (median of its first to its last quarter, after 10 s; {len(growth)} processes); "
        f"each rank's last three processes against its first three at most {trend:+.1f} MiB; "
        f"the launcher grew {launcher_growth:.1f} MiB",
        f"- open files per worker: largest spread in one process's life {max(fd_spread, default=0)}; "
        f"checkpoint directories at the end {len(kept)} (keep_last {KEEP_LAST}); temporary files left {leftovers}",
        f"- last step seen by the sampler {last}; the curve: rss.svg, the samples: soak.csv",
    ]
    lines.append("- verdict: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    with open(os.path.join(OUT, "soak.md"), "w") as f:
        f.write("# Soak\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failures else 0)


def write_svg(samples, faults, path):
    width, height, left, bottom = 900, 320, 60, 40
    points = [(s["t"], s.get(f"rss{r}")) for s in samples for r in (0, 1) if s.get(f"rss{r}")]
    if not points:
        return
    t_max = max(t for t, _ in points) or 1
    mib = [v / 2**20 for _, v in points]
    top = max(mib) * 1.15
    x = lambda t: left + (width - left - 20) * t / t_max
    y = lambda m: height - bottom - (height - bottom - 20) * m / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 20}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="20" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">seconds</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">resident MiB</text>']
    for tick in range(0, int(top) + 1, max(int(top) // 5, 1)):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4}" text-anchor="end">{tick}</text>')
    for tick in range(0, int(t_max) + 1, max(int(t_max) // 6, 1)):
        parts.append(f'<text x="{x(tick)}" y="{height - bottom + 16}" text-anchor="middle">{tick}</text>')
    for fault in faults:
        parts.append(f'<line x1="{x(fault["t"])}" y1="20" x2="{x(fault["t"])}" y2="{height - bottom}" stroke="#d33" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x(fault["t"]) + 3}" y="32" fill="#d33">{fault["signal"]} r{fault["rank"]}</text>')
    for rank, colour in ((0, "#1f77b4"), (1, "#2ca02c")):
        series = " ".join(f"{x(s['t']):.1f},{y(s[f'rss{rank}'] / 2**20):.1f}" for s in samples if s.get(f"rss{rank}"))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{series}"/>')
        parts.append(f'<text x="{width - 120}" y="{40 + 16 * rank}" fill="{colour}">rank {rank}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
