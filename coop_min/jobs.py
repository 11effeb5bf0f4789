"""Running a sweep's jobs: one subprocess per job, one job per device at a time.

A job is a finished run when its folder holds results.json; one with state.pt is continued with its
`resume` command; an evaluation waits for the run it `needs`. Each job runs in a process group of its
own, so a Ctrl-C reaches the sweep alone, which passes it on to every running job once.
"""
import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass

from coop_min.files import write_json


@dataclass
class Job:
    label: str
    folder: str
    argv: list                               # the command of a new run or of an evaluation
    line: list                               # this one run as a sweep command (--print-commands)
    resume: list | None = None               # a train run: the command that continues it
    expect: dict | None = None               # a train run: settings its config.json must hold
    needs: str | None = None                 # an evaluation: the run whose prompts or classifier it tests
    sidecar: dict | None = None              # an evaluation: its sweep.json


def done(folder):
    return os.path.exists(os.path.join(folder, "results.json"))


def _outcome(folder):
    """What a finished run or evaluation found, in one phrase."""
    with open(os.path.join(folder, "results.json")) as f:
        r = json.load(f)
    if "new" in r and "harmonic_mean" in r:
        return f"base {r['base']:.2f}% new {r['new']:.2f}% H {r['harmonic_mean']:.2f}"
    return f"accuracy {r['accuracy']:.2f}%"


def _launch(job, device, typed, log):
    """The job's subprocess on `device` (None: the default; "cpu"; a CUDA index), its output into `log`."""
    resume = job.resume is not None and os.path.exists(os.path.join(job.folder, "state.pt"))
    argv = list(job.resume if resume else job.argv)
    env = dict(os.environ)
    if device == "cpu" and "device" not in typed:
        argv += ["--device", "cpu"]
    elif device not in (None, "cpu"):
        env["CUDA_VISIBLE_DEVICES"] = device
    if job.sidecar is not None:
        os.makedirs(job.folder, exist_ok=True)
        write_json(os.path.join(job.folder, "sweep.json"), job.sidecar)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, "continue" if resume else "start"


def _last_line(path):
    with open(path, errors="replace") as f:
        return ([line.strip() for line in f if line.strip()] or ["no output"])[-1]


def execute(jobs, devices, typed, out):
    """Run the unfinished jobs, one per device at a time; returns the folders of those that failed.
    `typed`: the train fields the command line set (a --device given wins over --devices cpu)."""
    todo = [(i, job) for i, job in enumerate(jobs, 1) if not done(job.folder)]
    logs = os.path.join(out, "sweep-logs")
    failed = []
    running = {}                             # process: (number, job, device, start time, log)
    free = list(devices)
    n = len(jobs)
    print(f"{n} runs: {n - len(todo)} finished (skipped), {len(todo)} to run; their output goes to {logs}",
          flush=True)
    try:
        while todo or running:
            for proc in [p for p in running if p.poll() is not None]:
                i, job, device, t0, log = running.pop(proc)
                free.append(device)
                if proc.returncode == 0 and done(job.folder):
                    minutes = (time.monotonic() - t0) / 60
                    print(f"[{i}/{n}] done in {minutes:.1f} min: {_outcome(job.folder)}", flush=True)
                else:
                    failed.append(job.folder)
                    print(f"[{i}/{n}] failed (exit {proc.returncode}): {_last_line(log)} (see {log})",
                          flush=True)
            for i, job in [(i, job) for i, job in todo if job.needs in failed]:
                todo.remove((i, job))
                failed.append(job.folder)
                print(f"[{i}/{n}] {job.label}: not run, {job.needs} did not finish", flush=True)
            ready = [(i, job) for i, job in todo if job.needs is None or done(job.needs)]
            for i, job in ready[:len(free)]:
                todo.remove((i, job))
                device = free.pop(0)
                log = os.path.join(logs, os.path.relpath(job.folder, out) + ".log")
                proc, verb = _launch(job, device, typed, log)
                running[proc] = (i, job, device, time.monotonic(), log)
                on = "" if device is None else " on cpu" if device == "cpu" else f" on cuda {device}"
                print(f"[{i}/{n}] {job.label}: {verb}{on} -> {job.folder}", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(running)
        raise
    return failed


def _stop(running):
    """Pass the interrupt on to each running job once, and wait for it to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in running:
        proc.send_signal(signal.SIGINT)
    for proc in running:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
