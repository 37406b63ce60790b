"""A run's records as TensorBoard event files (lean.train --tensorboard): the scalars metrics.jsonl holds.

Losses, the learning rate, speed and the validation losses are plotted against the iteration; each
evaluation's 12 COCO numbers and each class's AP and AP50 against the epoch (tags such as `bbox/AP`,
`segm/AP50`, `bbox_per_class/person/AP`). tensorboard is optional: `pip install -e '.[tensorboard]'`.
"""

import importlib.util

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
INSTALL = "pip install tensorboard (lean's extra: pip install -e '.[tensorboard]')"


def tensorboard_missing():
    return importlib.util.find_spec("tensorboard") is None


def scalars(record):
    """(tag, value, step) of each number a metrics record holds."""
    if "per_class" in record:
        return [
            (f"{kind}_per_class/{name}/{stat}", value, record["epoch"])
            for kind, classes in record["per_class"].items()
            for name, values in classes.items()
            for stat, value in values.items()
        ]
    found = []
    for key, value in record.items():
        if key in ("epoch", "iteration"):
            continue
        if isinstance(value, list):  # an evaluation's 12 COCO numbers
            found += [(f"{key}/{stat}", number, record["epoch"]) for stat, number in zip(STATS, value)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append((key, value, record.get("iteration", record.get("epoch"))))
    return found


class Board:
    """Event files in `folder`, a record at a time; close() flushes them."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def add(self, record):
        for tag, value, step in scalars(record):
            self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()
