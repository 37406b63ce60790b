import pytest
import torch

from lean.cache import Cache
from lean.graphs import capture_graphs
from lean.loader import Loader
from lean.model import ModelSpec, create_model
from lean.speed import Speed

SPEC = ModelSpec("mobilenet_v3_fpn", ("a",), min_size=96, max_size=160, pretrained=False)  # live BatchNorm
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_cpu_model_records_no_graph_and_stays_as_it_was():
    model = create_model(SPEC, speed=Speed(canvases=True)).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert capture_graphs(model, 2, None) == (0, 0.0)
    assert "forward" not in vars(model.backbone) and "forward" not in vars(model.rpn.head)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def _step(model, images, targets):
    torch.manual_seed(1)  # the samplers draw from it: both models draw the same regions
    losses = model(images, targets)
    sum(losses.values()).backward()
    return {name: loss.detach() for name, loss in losses.items()}


@needs_cuda
def test_graphed_steps_give_the_eager_steps_losses_gradients_and_statistics(tiny, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 on both sides
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager = create_model(SPEC, speed=Speed(canvases=True), device="cuda").train()
    state = {key: value.clone() for key, value in eager.state_dict().items()}
    graphed = create_model(SPEC, state, speed=Speed(canvases=True), device="cuda").train()
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    recorded, _ = capture_graphs(graphed, 2, None)
    ladder = graphed.transform.canvas_ladder
    assert recorded == 2 * len(ladder) ** 2
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert all(torch.equal(value, state[key]) for key, value in graphed.state_dict().items())  # statistics put back
    loader = Loader(Cache(tiny), 2, shuffle=False, device="cuda", train=True, dtype=torch.uint8)
    for images, targets in list(loader)[:3]:  # replays of several canvases, in turn
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
        want, got = _step(eager, images, targets), _step(graphed, images, targets)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4, msg=name)
        for (name, ours), theirs in zip(graphed.named_parameters(), eager.parameters()):
            if theirs.grad is not None:
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-2, atol=1e-4, msg=name)
        for (name, ours), theirs in zip(graphed.named_buffers(), eager.buffers()):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=name)  # live statistics moved alike
    graphed.eval()
    with torch.no_grad():  # evaluation runs eager, any size
        assert len(graphed([torch.zeros(3, 50, 70, dtype=torch.uint8, device="cuda")])) == 1
