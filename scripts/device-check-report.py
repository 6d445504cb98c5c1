#!/usr/bin/env python3
"""Reads what scripts/device-check.sh recorded and writes its report (standard library only).

    device-check-report.py peak JOB_DIR [SMI_FILE]   peak GPU memory of an effnet run, in bytes (reserved)
    device-check-report.py report FACTS [--out DIR]  the Markdown block for docs/benchmarks.md

FACTS holds key=value lines; keys name a phase (`effnet-b7.rc`, `torch-b0.json`, ...) or the
machine (`gpu_name`, `torch`, ...). Peak GPU memory of an effnet run is the trainer's own record
(`gpu_memory_peak_bytes` in step records or the run summary) when the build has it, else the
highest `memory.used` nvidia-smi sampled during the run (device-wide: CUDA context and the caching
allocator's reserve included, so an upper bound)."""

import json
import os
import shutil
import sys
import time

GIB = 1024**3


def read_jsonl(path):
    records = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return records


def last_json_line(path):
    try:
        with open(path) as f:
            lines = [line for line in f if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def smi_peak_bytes(path):
    values = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    values.append(float(line.strip()))
                except ValueError:
                    pass
    except (OSError, TypeError):
        pass
    return int(max(values) * 1024**2) if values else None


def effnet_peak_bytes(job_dir, field="gpu_memory_peak_bytes"):
    """The trainer's own peak (the CUDA caching allocator's), from step records or the end summary:
    `gpu_memory_peak_bytes` (allocated) or `gpu_memory_reserved_peak_bytes` (reserved)."""
    records = read_jsonl(os.path.join(job_dir, "metrics.jsonl"))
    peaks = []
    for record in records:
        for holder in (record, record.get("summary") or {}):
            value = holder.get(field) if isinstance(holder, dict) else None
            if isinstance(value, (int, float)) and value > 0:
                peaks.append(int(value))
    return max(peaks) if peaks else None


def effnet_summary(job_dir, warmup):
    records = read_jsonl(os.path.join(job_dir, "metrics.jsonl"))
    steps = [r for r in records if r.get("type") == "step"]
    timed = [s for s in steps if s.get("step", 0) > warmup]
    start = next((r for r in records if r.get("type") == "start"), {})
    out = {"steps": len(steps), "timed_steps": len(timed), "environment": start.get("environment"),
           "device": start.get("device")}
    if steps:
        out["first_step_s"] = steps[0].get("step_s")
        out["loss_first"], out["loss_last"] = steps[0].get("loss"), steps[-1].get("loss")
    if timed:
        samples = sum(s.get("samples", 0) for s in timed)
        seconds = sum(s.get("step_s", 0.0) for s in timed)
        waited = sum(s.get("data_wait", 0.0) * s.get("step_s", 0.0) for s in timed)
        if seconds > 0:
            out["images_per_s"] = samples / seconds
            out["data_wait"] = waited / seconds
            if seconds - waited > 0:
                out["step_only_images_per_s"] = samples / (seconds - waited)
    out["gpu_memory_peak_bytes"] = effnet_peak_bytes(job_dir)
    currents = [s.get("gpu_memory_bytes") for s in steps if isinstance(s.get("gpu_memory_bytes"), (int, float))]
    out["gpu_memory_bytes_last"] = currents[-1] if currents else None
    return out


def checkpoint_stall(job_dir, warmup):
    """What the first checkpoint saved after the warm-up cost training: the seconds it blocked the
    training thread (`blocked_s`) plus how much longer than the other timed steps the steps it
    overlapped took (those logged between its step and its own record, written when it finished),
    in seconds and in steps. None without such a checkpoint."""
    records = read_jsonl(os.path.join(job_dir, "metrics.jsonl"))
    steps = [r for r in records if r.get("type") == "step"]
    last = steps[-1].get("step") if steps else None
    for index, record in enumerate(records):
        if record.get("type") != "checkpoint" or not isinstance(record.get("blocked_s"), (int, float)):
            continue
        step = record.get("step", 0)
        if step <= warmup or step == last:
            continue
        overlapped = [r.get("step_s", 0.0) for r in records[:index]
                      if r.get("type") == "step" and r.get("step", 0) > step]
        others = sorted(s.get("step_s", 0.0) for s in steps
                        if s.get("step", 0) > warmup and not step < s.get("step", 0) <= step + len(overlapped))
        if not others:
            return None
        typical = others[len(others) // 2]
        slower = sum(max(0.0, s - typical) for s in overlapped)
        stall = record["blocked_s"] + slower
        return {"step": step, "bytes": record.get("bytes"), "save_s": record.get("save_s"),
                "blocked_s": record["blocked_s"], "overlapped_steps": len(overlapped), "slower_s": slower,
                "median_step_s": typical, "stall_s": stall, "stall_steps": stall / typical if typical else None}
    return None


def number(value, digits=1):
    return "–" if value is None else f"{value:,.{digits}f}"


def gib(value):
    return "–" if value is None else f"{value / GIB:.1f} GiB"


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}×" if ours and theirs else "–"


def last_line(path):
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1] if lines else ""
    except (OSError, TypeError):
        return ""


def load_facts(path):
    facts, lists = {}, {"problem": [], "bundled_library": []}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            if key in lists:
                lists[key].append(value)
            else:
                facts[key] = value
    return facts, lists


def phase_outcome(facts, name):
    rc = facts.get(f"{name}.rc")
    if rc is None:
        return "not run"
    if rc == "skipped":
        return "skipped: out of time"
    if rc == "0":
        return "ok"
    if rc == "124":
        return f"timed out ({facts.get(name + '.seconds', '?')} s)"
    return f"failed (exit {rc})"


def report(facts_path, out_dir):
    facts, lists = load_facts(facts_path)
    rehearse = facts.get("rehearse") == "1"
    result = {"facts": facts, "problems": lists["problem"], "bundled_libraries": lists["bundled_library"]}
    lines = []
    date = time.strftime("%Y-%m-%d")
    gpu = facts.get("gpu_name") or facts.get("gpu") or "no GPU"
    memory = facts.get("gpu_memory_bytes")
    title = f"### GPU (device check): {date}, {gpu}"
    if memory:
        title += f" ({int(memory) / GIB:.0f} GiB)"
    if rehearse:
        title += " — REHEARSAL on a CPU machine: not GPU figures"
    lines += [title, ""]
    manifest = {}
    if facts.get("bundle_manifest"):
        try:
            with open(facts["bundle_manifest"]) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            pass
    commit = (manifest.get("commit") or "")[:10]
    precision = "bf16 autocast" if facts.get("precision", "bf16") == "bf16" else "fp32"
    built = (f"commit {commit}" if manifest.get("commit") else "a local build") + \
        (" with uncommitted changes" if manifest.get("dirty") else "")
    lines.append(
        f"`scripts/device-check.sh` ({facts.get('total_seconds', '?')} s in all): `{facts.get('effnet_version', '?')}` "
        f"({built}), built on a CPU machine against the PyPI torch {manifest.get('torch', '2.11.0')} CUDA libtorch "
        f"and run against this machine's torch {facts.get('torch') or '?'} (CUDA {facts.get('torch_cuda') or '?'}, "
        f"NCCL {facts.get('nccl') or '?'}). {precision}, channels_last, RMSProp-TF, {facts.get('classes', '?')} "
        f"classes, EMA off. effnet reads {int(facts.get('images', 0)):,} generated ImageNet-format JPEGs (~500×375, "
        f"benches/make_image_folder.py) through its whole input pipeline (Parquet, decode, RandomResizedCrop, "
        f"flip; loader threads: {facts.get('loader_threads', '?')}); \"step only\" leaves out its wait for data. "
        f"PyTorch eager: torchvision's models, same batch and settings, random data already on the GPU "
        f"(benches/pytorch_train_gpu.py). Images/s over the steps after the warm-up.")
    lines.append("")

    # (a) collectives.
    lines += ["| check | result |", "|---|---|"]
    collective = None
    if facts.get("collective.report") and os.path.exists(facts["collective.report"]):
        with open(facts["collective.report"]) as f:
            collective = json.load(f)
    outcome = phase_outcome(facts, "collective")
    if collective:
        cases = collective.get("cases", [])
        passed = sum(1 for c in cases if c.get("passed"))
        text = f"{passed}/{len(cases)} cases passed"
        failed = [c["name"] for c in cases if not c.get("passed")]
        if failed:
            text += f" (failed: {', '.join(failed)})"
        biggest = max(collective.get("bandwidth", []), key=lambda b: b.get("bytes", 0), default=None)
        if biggest:
            text += f"; all-reduce of {biggest['bytes'] / 2**20:.0f} MiB in {biggest['seconds'] * 1000:.2f} ms"
        result["collective"] = collective
    else:
        text = f"{outcome}: {last_line(facts.get('collective.err'))}" if outcome != "ok" else outcome
    lines.append(f"| NCCL conformance suite, world 1 (`effnet-collective-check --backend nccl`) | {text} |")
    nccl_train = facts.get("nccl-train.job_dir")
    if nccl_train:
        summary = effnet_summary(nccl_train, 0)
        outcome = phase_outcome(facts, "nccl-train")
        if outcome == "ok":
            text = (f"ok: {summary['steps']} B0 steps through NCCL gradient sums, loss "
                    f"{number(summary.get('loss_first'), 3)} → {number(summary.get('loss_last'), 3)}")
        else:
            text = f"{outcome}: {last_line(facts.get('nccl-train.err'))}"
        lines.append(f"| NCCL in training, world 1 (`effnet worker`, B0 batch 32) | {text} |")
        result["nccl_train"] = summary
    nccl_coord = facts.get("nccl-coord.job_dir")
    if nccl_coord:
        outcome = phase_outcome(facts, "nccl-coord")
        state = facts.get("nccl-coord.state", "unknown")
        if outcome == "ok":
            summary = effnet_summary(nccl_coord, 0)
            text = f"ok: {summary['steps']} B0 steps, NCCL id through the coordinator, job {state}"
            result["nccl_coordinator"] = summary
        else:
            text = f"{outcome}: {last_line(facts.get('nccl-coord.err'))}"
        lines.append(f"| NCCL through the coordinator, world 1 (`effnet worker --coordinator`) | {text} |")
    if lists["bundled_library"]:
        lines.append(f"| libraries taken from the bundle (absent here) | {', '.join(lists['bundled_library'])} |")
    lines.append("")

    # (b) and (d): throughput.
    lines += ["| model | batch | effnet images/s (data wait) | effnet step only | PyTorch eager | "
              "effnet / PyTorch (step only) | peak GPU memory effnet / PyTorch |",
              "|---|---|---|---|---|---|---|"]
    memory_sources = set()
    override = facts.get("resolution_override")
    b7_label = f"B7@{override or 600}"
    for variant, label in (("b0", f"B0@{override or 224}"), ("b7", b7_label)):
        ours_name, theirs_name = f"effnet-{variant}", f"torch-{variant}"
        ours = effnet_summary(facts[ours_name + ".job_dir"], int(facts.get(ours_name + ".warmup", 0))) \
            if facts.get(ours_name + ".job_dir") else {}
        theirs = last_json_line(facts.get(theirs_name + ".json", "")) or {}
        result[ours_name], result[theirs_name] = ours, theirs
        ours_outcome, theirs_outcome = phase_outcome(facts, ours_name), phase_outcome(facts, theirs_name)
        ours_rate = ours.get("images_per_s") if ours_outcome == "ok" else None
        ours_step = ours.get("step_only_images_per_s") if ours_outcome == "ok" else None
        theirs_rate = theirs.get("images_per_s")
        if ours.get("gpu_memory_peak_bytes"):
            ours_peak, source = ours["gpu_memory_peak_bytes"], "allocator"
            theirs_peak = theirs.get("peak_memory_allocated_bytes")
        else:
            ours_peak, source = smi_peak_bytes(facts.get(ours_name + ".smi")), "nvidia-smi"
            theirs_peak = smi_peak_bytes(facts.get(theirs_name + ".smi"))
        if ours_peak or theirs_peak:
            memory_sources.add(source)
        batch = facts.get(ours_name + ".batch") or theirs.get("batch") or "?"
        ours_text = (f"{number(ours_rate)} ({100 * ours.get('data_wait', 0):.1f}%)" if ours_rate
                     else ours_outcome)
        theirs_text = number(theirs_rate) if theirs_rate else (theirs.get("error") or theirs_outcome)
        lines.append(f"| {label} | {batch} | {ours_text} | {number(ours_step)} | {theirs_text} | "
                     f"**{ratio(ours_rate, theirs_rate)}** ({ratio(ours_step, theirs_rate)}) | "
                     f"{gib(ours_peak)} / {gib(theirs_peak)} |")
    lines.append("")
    stall = checkpoint_stall(facts["effnet-b7.job_dir"], int(facts.get("effnet-b7.warmup", 0))) \
        if facts.get("effnet-b7.job_dir") else None
    result["checkpoint_stall"] = stall
    if stall:
        lines.append(f"Checkpoint stall ({b7_label}, the save at step {stall['step']}, "
                     f"{(stall['bytes'] or 0) / 1e6:,.0f} MB, {number(stall['save_s'], 2)} s to save): "
                     f"{number(stall['blocked_s'], 3)} s blocking the training thread + "
                     f"{number(stall['slower_s'], 3)} s slower over the {stall['overlapped_steps']} steps it overlapped "
                     f"= **{number(stall['stall_steps'], 2)} steps** of {number(stall['median_step_s'], 3)} s.")
        lines.append("")
    if "allocator" in memory_sources:
        lines.append("Peak GPU memory: the caching allocator's peak of allocated bytes (effnet's "
                     "`gpu_memory_peak_bytes`, PyTorch's `max_memory_allocated`).")
    elif memory_sources:
        lines.append("Peak GPU memory: the highest `memory.used` nvidia-smi sampled every 250 ms during each run "
                     "(this effnet build records no allocator peak): CUDA context and allocator reserve included.")
    if memory_sources:
        lines.append("")

    # (c) the largest batch.
    tries = []
    index = 1
    while f"search-{index}.batch" in facts:
        name = f"search-{index}"
        batch = facts[f"{name}.batch"]
        outcome = {"oom": "out of memory"}.get(facts.get(f"{name}.outcome"), facts.get(f"{name}.outcome")) \
            or phase_outcome(facts, name)
        peak = effnet_peak_bytes(facts.get(f"{name}.job_dir", "")) or smi_peak_bytes(facts.get(f"{name}.smi"))
        tries.append({"batch": int(batch), "outcome": outcome, "peak_bytes": peak,
                      "seconds": facts.get(f"{name}.seconds")})
        index += 1
    result["search"] = tries
    if "search.fit" in facts:
        fit, fail = int(facts["search.fit"]), int(facts.get("search.fail", 0))
        told = "; ".join(f"{t['batch']} {t['outcome']}" + (f" ({gib(t['peak_bytes'])})" if t["peak_bytes"] else "")
                         for t in tries)
        bound = f", {fail} does not" if fail else ", no larger batch tried out of memory"
        lines.append(f"Largest {b7_label} batch per GPU ({precision}, channels_last, RMSProp-TF, {len(tries)} tries of "
                     f"a few steps): **{fit}** fits{bound} (tries: {told or 'none'}).")
    else:
        lines.append(f"Largest {b7_label} batch per GPU: not searched (the B7 run did not succeed or no time was left).")
    lines.append("")

    # Phases that failed (an out-of-memory try of the search is an answer, not a failure; without a
    # GPU the NCCL suite cannot pass, which a rehearsal expects).
    phases = sorted(key[:-3] for key in facts if key.endswith(".rc"))
    failed = [p for p in phases if facts[p + ".rc"] not in ("0", "skipped") and not p.startswith("search-")
              and not (rehearse and p == "collective")]
    skipped = [p for p in phases if facts[p + ".rc"] == "skipped"]
    result.update({"failed_phases": failed, "skipped_phases": skipped})
    if failed:
        lines.append("Failed phases: " + ", ".join(f"{p} ({phase_outcome(facts, p)})" for p in failed) + ".")
    if skipped:
        lines.append("Skipped for lack of time: " + ", ".join(skipped) + ".")
    if lists["problem"]:
        lines.append("Problems: " + "; ".join(lists["problem"]) + ".")
    if failed or skipped or lists["problem"]:
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "device-check.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, "device-check.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        for name in ("effnet-b0", "effnet-b7"):
            source = os.path.join(facts.get(f"{name}.job_dir", ""), "metrics.jsonl")
            if os.path.exists(source):
                shutil.copy(source, os.path.join(out_dir, f"{name}-metrics.jsonl"))
        if facts.get("collective.report") and os.path.exists(facts["collective.report"]):
            shutil.copy(facts["collective.report"], os.path.join(out_dir, "collective-rank-0.json"))
    return 1 if failed or lists["problem"] else 0


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "peak":
        # For the batch search: what the allocator reserved is what runs out first.
        peak = effnet_peak_bytes(sys.argv[2], "gpu_memory_reserved_peak_bytes") or effnet_peak_bytes(sys.argv[2])
        if peak is None and len(sys.argv) > 3:
            peak = smi_peak_bytes(sys.argv[3])
        if peak:
            print(peak)
    elif len(sys.argv) >= 3 and sys.argv[1] == "report":
        out_dir = sys.argv[4] if len(sys.argv) >= 5 and sys.argv[3] == "--out" else None
        sys.exit(report(sys.argv[2], out_dir))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
