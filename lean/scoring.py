"""A run's evaluations scored in another process while training goes on.

After an epoch the training process predicts on the held-out images (on the device) and hands the
detections, RLE-encoded, to a scoring process; pycocotools' evaluation, all Python, runs there while the
next epoch trains. That process builds the ground truth once, from the cache, for every evaluation of
the run. Reports come back in the order the epochs were sent. On a CPU, whose cores the training step
fills, InlineScorer scores at once in the training process, with the same ground truth kept.

Evaluations ties them to a run: each report is logged when it arrives, and the checkpoint saved at the end
of its epoch, kept aside while it was scored, becomes best.pt if its AP is the best yet.
"""

import contextlib
import multiprocessing
import queue

from lean.errors import LeanError

SPAWN = multiprocessing.get_context("spawn")  # the training process holds CUDA: a forked child must not


class Scorer:
    """Scores detections of `indices` of the cache at `cache_path` in a process of its own; a context manager
    that ends the process on the way out. `submit(epoch, results)`, then `ready()` or `wait()` for the
    (epoch, report, text) of each, as lean.evaluate.score gives them."""

    def __init__(self, cache_path, indices, metrics):
        self.jobs, self.reports = SPAWN.Queue(), SPAWN.Queue()
        self.process = SPAWN.Process(
            target=_serve,
            args=(str(cache_path), [int(i) for i in indices], tuple(metrics), self.jobs, self.reports),
            name="lean-scorer",
            daemon=True,
        )
        self.process.start()
        self.pending = 0

    def submit(self, epoch, results):
        self.jobs.put((epoch, results))
        self.pending += 1

    def ready(self):
        """The reports that have arrived, without waiting."""
        arrived = []
        while self.pending:
            try:
                arrived.append(self._receive(block=False))
            except queue.Empty:
                break
        return arrived

    def wait(self):
        """Every report still to come."""
        return [self._receive(block=True) for _ in range(self.pending)]

    def _receive(self, block):
        while True:
            try:
                message = self.reports.get(block=block, timeout=1.0 if block else None)
                break
            except queue.Empty:
                if not block:
                    raise
                if not self.process.is_alive():
                    raise LeanError("the scoring process ended without scoring the last evaluation") from None
        self.pending -= 1
        return _delivered(*message)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        with contextlib.suppress(OSError, ValueError):
            self.jobs.put(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


class InlineScorer:
    """Scorer's interface, scoring each submission at once in this process."""

    def __init__(self, cache_path, indices, metrics):
        self.score = _scoring(cache_path, [int(i) for i in indices], tuple(metrics))
        self.done = []

    def submit(self, epoch, results):
        self.done.append((epoch, *_scored(self.score, results)))

    def ready(self):
        done, self.done = self.done, []
        return [_delivered(*message) for message in done]

    wait = ready

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass


def _scoring(cache_path, indices, metrics):
    """A function of results -> (report, text), the ground truth built once."""
    from lean.cache import Cache
    from lean.evaluate import ground_truth, score

    cache = Cache(cache_path)
    truth = ground_truth(cache, indices)
    return lambda results: score(truth, cache.classes, indices, results, metrics)


def _scored(scoring, results):
    """(report, text), or (None, why) where scoring failed: the training process says so in one line."""
    try:
        return scoring(results)
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def _delivered(epoch, report, text):
    if report is None:
        raise LeanError(f"scoring epoch {epoch}'s evaluation failed: {text}")
    return epoch, report, text


def _serve(cache_path, indices, metrics, jobs, reports):
    scoring = _scoring(cache_path, indices, metrics)
    while (job := jobs.get()) is not None:
        epoch, results = job
        reports.put((epoch, *_scored(scoring, results)))


class Evaluations:
    """A run's evaluations: `start` hands an epoch's detections to the scorer (None: the run evaluates
    nothing); `collect` logs the reports that have come (all of them, with `wait`), hands each earlier
    epoch's main AP to the checkpointer, and returns (this epoch's main AP if it came, the epoch if its
    checkpoint is to be kept aside awaiting it), what Checkpointer.save takes."""

    def __init__(self, scorer, log, checkpointer, main_metric):
        self.scorer, self.log, self.checkpointer, self.main_metric = scorer, log, checkpointer, main_metric
        self.submitted = set()
        self.latest = None  # the report of the latest epoch scored

    def start(self, epoch, results):
        self.scorer.submit(epoch, results)
        self.submitted.add(epoch)

    def collect(self, epoch, wait=False):
        if self.scorer is None:
            return None, None
        ap = None
        for scored, report, text in self.scorer.wait() if wait else self.scorer.ready():
            self.log.print(text)
            self.log.evaluation(scored, report)
            self.submitted.discard(scored)
            self.latest = report
            if scored == epoch:
                ap = report[self.main_metric]["AP"]
            else:
                self.checkpointer.scored(scored, report[self.main_metric]["AP"])
        return ap, epoch if epoch in self.submitted else None
