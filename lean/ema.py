"""An exponential moving average of a model's weights, kept beside the training ones: what --ema evaluates and
saves as the model.

Every floating-point entry of the state dict is averaged (BatchNorm's running statistics too, as Ultralytics
does); the rest (counters) are the model's own. The decay ramps up as timm's and TensorFlow's do, min(decay,
(1 + n) / (10 + n)) after n updates, so the average follows a young model closely instead of holding on to
its random start for thousands of steps: a small dataset's run is often shorter than that.
"""

import contextlib

import torch

from lean.internals import foreach_copy_, foreach_lerp_


class WeightsEMA:
    """The average of `model`'s weights, updated in place on their device after each step."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        state = model.state_dict()  # tensors that are the model's own, detached: they follow every step
        self.names = [name for name, value in state.items() if value.is_floating_point()]
        self.live = [state[name] for name in self.names]
        self.shadow = [value.clone() for value in self.live]

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        foreach_lerp_(self.shadow, self.live, 1 - decay)

    def averaged(self, model_state):
        """`model_state` (the model's state dict) with the averaged weights in place of the trained ones."""
        return {**model_state, **dict(zip(self.names, self.shadow))}

    def load(self, averaged_state, updates):
        """Take up the average a checkpoint saved (its model) after `updates` updates."""
        with torch.no_grad():
            for value, name in zip(self.shadow, self.names):
                value.copy_(averaged_state[name])
        self.updates = updates

    @contextlib.contextmanager
    def applied(self):
        """While entered, the model holds the averaged weights; its own come back on the way out."""
        with torch.no_grad():
            trained = [value.clone() for value in self.live]
            foreach_copy_(self.live, self.shadow)
            try:
                yield
            finally:
                foreach_copy_(self.live, trained)
