"""Scoring off the training thread: a scoring process's reports are lean.evaluate's, and a checkpoint kept aside
while its epoch was scored becomes best.pt when the score comes and is the best."""

import pytest
import torch

from lean.cache import Cache
from lean.errors import LeanError
from lean.evaluate import coco_eval, detections
from lean.scoring import Evaluations, InlineScorer, Scorer


def _predictions(cache, indices, jitter):
    generator = torch.Generator().manual_seed(jitter)
    predictions = []
    for index in indices:
        target = cache.target(index)
        boxes = target["boxes"] + torch.randn(target["boxes"].shape, generator=generator) * jitter
        predictions.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=generator),
                            "labels": target["labels"], "masks": target["masks"][:, None].float()})  # fmt: skip
    return predictions


@pytest.mark.parametrize("kind", [Scorer, InlineScorer])
def test_a_scorer_reports_what_coco_eval_reports_epoch_by_epoch_and_a_failure_in_one_line(tiny, kind):
    cache, indices = Cache(tiny), [0, 2, 3]
    wanted = {epoch: coco_eval(cache, indices, _predictions(cache, indices, epoch), verbose=False) for epoch in (1, 2)}
    with kind(tiny, indices, ("bbox", "segm")) as scorer:
        for epoch in (1, 2):
            scorer.submit(epoch, detections(indices, _predictions(cache, indices, epoch)))
        reports = scorer.wait()
        assert [epoch for epoch, _, _ in reports] == [1, 2]
        for epoch, report, text in reports:
            assert report == wanted[epoch] and "IoU metric: segm" in text
        scorer.submit(4, [{"image_id": 0, "category_id": 1, "bbox": "not a box", "score": 1.0}])
        with pytest.raises(LeanError, match="scoring epoch 4's evaluation failed"):
            scorer.wait()  # and the scorer goes on serving


class LateScorer:
    """Hands back each report one collect later than it was submitted."""

    def __init__(self, aps):
        self.aps, self.queued = aps, []

    def submit(self, epoch, results):
        self.queued.append(epoch)

    def ready(self):
        arrived = self.queued[:-1]
        self.queued = self.queued[-1:]
        return [(e, {"bbox": {"AP": self.aps[e], "stats": [self.aps[e]] * 12, "per_class": {}}}, "") for e in arrived]

    def wait(self):
        arrived, self.queued = self.queued, []
        return [(e, {"bbox": {"AP": self.aps[e], "stats": [self.aps[e]] * 12, "per_class": {}}}, "") for e in arrived]


def test_the_checkpoint_of_an_epoch_scored_late_becomes_best_pt_when_its_score_is_the_best(tmp_path):
    from lean.background import Writer
    from lean.checkpoint import Checkpointer, Position, RunFolder, load
    from lean.config import TrainConfig
    from lean.engine import RunState
    from lean.model import ModelSpec
    from lean.monitor import TrainingLog

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunState(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), torch.amp.GradScaler("cpu"))
    aps = {0: 0.2, 1: 0.6, 2: 0.4}
    with RunFolder(tmp_path), Writer() as writer, TrainingLog(tmp_path / "metrics.jsonl") as log:
        checkpointer = Checkpointer(tmp_path, run, ModelSpec(), TrainConfig(), "f" * 64, writer=writer)
        evaluations = Evaluations(LateScorer(aps), log, checkpointer, "bbox")
        for epoch in range(3):
            with torch.no_grad():
                model.bias.fill_(epoch)  # each epoch's checkpoint told apart by its bias
            evaluations.start(epoch, [])
            checkpointer.save(Position(epoch + 1, 0, epoch + 1), *evaluations.collect(epoch, wait=epoch == 2))
        writer.wait()
    assert load(tmp_path / "best.pt")["model"]["bias"].item() == 1.0  # epoch 1's, scored during epoch 2
    assert checkpointer.best_ap == 0.6 and load(tmp_path / "last.pt")["best_ap"] == 0.6
    assert not list(tmp_path.glob(".*.tmp"))  # the other kept checkpoints were let go
