"""The backbone replayed from CUDA graphs: eager where a graph cannot serve, and on a GPU the eager step's numbers."""

import pytest
import torch

from lean.model import ModelSpec, create_model
from lean.speed import Speed, tune_for_speed
from lean.train import main as train_main
from tests.conftest import cli, one_line


def test_on_the_cpu_the_backbone_runs_eager_and_nothing_is_recorded():
    torch.manual_seed(0)
    model = tune_for_speed(create_model(ModelSpec("mobilenet_v3_fpn", pretrained=False)), Speed(compile="graphs"))
    graphs = model.backbone_graphs
    images = torch.rand(2, 3, 64, 96)
    torch.manual_seed(1)
    got = graphs(images)
    torch.manual_seed(1)
    want = model.backbone(images)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want) and not graphs.graphs


def test_graphs_asked_for_on_the_cpu_are_one_line(capsys):
    status, _, stderr = cli(train_main, ["--device", "cpu", "--compile", "graphs"], capsys)
    assert one_line(status, stderr, "--compile", "graphs is for CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_graphed_steps_give_the_eager_steps_losses_gradients_and_norm_statistics(monkeypatch):
    """From scratch (live BatchNorm, whose statistics the capture's warm-up passes must not keep), in fp32."""
    from tests.test_model import _first_batch

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    images, targets = _first_batch("cuda")
    runs = {}
    for compile in ("off", "graphs"):
        torch.manual_seed(0)
        spec = ModelSpec("resnet50_fpn", min_size=160, max_size=256, pretrained=False)
        model = create_model(spec, speed=Speed(compile=compile, canvases=True), device="cuda").train()
        steps = []
        for _ in range(2):  # the second replays what the first recorded
            torch.manual_seed(1)
            losses = model(images, targets)
            model.zero_grad()
            sum(losses.values()).backward()
            steps.append({name: loss.item() for name, loss in losses.items()})
        runs[compile] = steps, model.backbone.body.layer1[0].conv1.weight.grad.clone(), model.state_dict()
    (eager, eager_grad, eager_state), (graphed, graphed_grad, graphed_state) = runs["off"], runs["graphs"]
    for want, got in zip(eager, graphed):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(graphed_grad, eager_grad, rtol=1e-4, atol=1e-6)
    for name in ("backbone.body.bn1.running_mean", "backbone.body.bn1.num_batches_tracked"):
        torch.testing.assert_close(graphed_state[name], eager_state[name], rtol=1e-5, atol=1e-6)
