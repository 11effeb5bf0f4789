"""What a training run reports while it trains: progress lines on stdout and in log.txt, one JSON line
per logged step or epoch in metrics.jsonl, and the means, throughput and ETA the lines show.

Two cadences, for two readers. metrics.jsonl gets a line every --print-every steps and at each
epoch's end: a function of the step alone, so a resumed run writes the file an uninterrupted run
writes. A person gets a progress line at the first of them (an early ETA), then at the first after
every PRINT_SECONDS of training, and at the run's last step: a run of minutes prints a few dozen
lines whatever its number of steps, and a slow run one at every metrics line.
"""
import json
import os
import time
from typing import NamedTuple

PRINT_SECONDS = 5.0


def duration(seconds):
    """'0.4s', '42s', '3.5 min', '1.2 h'."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class RunLog:
    """Progress to stdout and log.txt; one JSON line per step/epoch to metrics.jsonl. metrics_bytes:
    a resumed run's metrics.jsonl is cut back to the length its checkpoint recorded."""

    def __init__(self, folder, metrics_bytes=None):
        self.log = open(os.path.join(folder, "log.txt"), "a")
        path = os.path.join(folder, "metrics.jsonl")
        if metrics_bytes is not None and os.path.exists(path):   # drop the lines after the checkpoint
            with open(path, "r+") as f:
                f.truncate(metrics_bytes)
        self.metrics = open(path, "a")
        self.stdout = True                   # False once a closed pipe (`| head`) stops reading it

    def print(self, line):
        if self.stdout:
            try:
                print(line, flush=True)
            except BrokenPipeError:          # the run goes on; log.txt keeps every line
                self.stdout = False
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # so Python's exit flush does not fail again
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.log.flush()

    def record(self, **values):
        self.metrics.write(json.dumps(values) + "\n")
        self.metrics.flush()

    def metrics_bytes(self):
        return self.metrics.tell()


class QuietLog:
    """What a process other than rank 0 logs: nothing (rank 0 writes the run folder)."""

    def print(self, line):
        pass

    def record(self, **values):
        pass


class Tally(NamedTuple):
    """What a checkpoint keeps of the progress, so that a resumed run logs what an uninterrupted one
    does: the sums [loss, correct, images] of the steps since the last metrics line and of the epoch's
    metrics lines so far, and the seconds the run has trained."""
    unreported: list
    epoch: list
    seconds: float


class Throughput(NamedTuple):
    train_seconds: float                     # the run's, a resumed run's earlier processes included
    images_per_second: float                 # training images per second of this process's training


class Progress:
    """Means since the last progress line, throughput, and an ETA from the run's average step time.

    step() after every training step; add() the sums (loss, correct, images) of the steps since the
    last metrics line, then line() when due(); epoch_means() at each epoch's end. clock: seconds
    (time.monotonic; tests pass a fake one)."""

    def __init__(self, steps_left, clock=time.monotonic, every=PRINT_SECONDS):
        self.clock = clock
        self.every = every
        self.steps_left = steps_left
        self.steps = 0
        self.images = 0                      # trained by this process (every rank's)
        self.start = clock()
        self.last = self.start               # when the last progress line was printed
        self.lines = 0
        self.seconds_before = 0.0            # a resumed run's training before this process
        self.line_totals = [0.0, 0, 0]
        self.epoch_totals = [0.0, 0, 0]

    def step(self):
        self.steps += 1
        self.steps_left -= 1

    def add(self, loss_sum, correct, n):
        self.images += n
        for totals in (self.line_totals, self.epoch_totals):
            totals[0] += loss_sum
            totals[1] += correct
            totals[2] += n

    def due(self):
        """A progress line is due: the first, PRINT_SECONDS after the last, or the run's last step."""
        return self.lines == 0 or self.clock() - self.last >= self.every or self.steps_left == 0

    def line(self):
        """'loss L acc A% R img/s eta T' over the steps since the last line."""
        loss_sum, correct, n = self.line_totals
        now = self.clock()
        rate = n / max(now - self.last, 1e-9)
        eta = (now - self.start) / max(self.steps, 1) * self.steps_left
        self.last = now
        self.lines += 1
        self.line_totals = [0.0, 0, 0]
        return (f"loss {loss_sum / max(n, 1):.4f} acc {100.0 * correct / max(n, 1):.1f}% {rate:.1f} img/s "
                f"eta {duration(eta)}")

    def epoch_means(self):
        loss_sum, correct, n = self.epoch_totals
        self.epoch_totals = [0.0, 0, 0]
        return {"mean_loss": round(loss_sum / max(n, 1), 6),
                "mean_acc": round(100.0 * correct / max(n, 1), 4)}

    def seconds(self):
        """The run's training seconds so far, a resumed run's earlier processes included."""
        return self.seconds_before + self.clock() - self.start

    def throughput(self):
        """The run's training seconds, and the images per second this process trained, at one time."""
        mine = self.clock() - self.start
        return Throughput(self.seconds_before + mine, self.images / max(mine, 1e-9))

    def tally(self, unreported):
        """What a checkpoint keeps, given the sums of the steps since the last metrics line."""
        return Tally([float(x) for x in unreported], [float(x) for x in self.epoch_totals], self.seconds())

    def resume(self, tally):
        """Continue from a checkpoint's Tally; returns its sums since the last metrics line."""
        self.epoch_totals = list(tally.epoch)
        self.seconds_before = tally.seconds
        self.images -= tally.unreported[2]  # trained before the checkpoint, added with the next line
        return list(tally.unreported)
