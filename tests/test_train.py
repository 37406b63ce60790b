"""Training: the step, the command and its arguments, classes from the cache, failure, signals, compile and DDP."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lean.cache import Cache, build
from lean.canvas import canvas_ladder
from lean.checkpoint import load_model
from lean.ema import WeightsEMA
from lean.engine import train_step, validation_losses
from lean.loader import Loader
from lean.model import ModelSpec, create_model
from lean.monitor import Monitor, TrainingLog
from lean.optim import make_optimizer, make_scheduler
from lean.speed import Speed, channels_last_is_fast
from lean.synthetic import SyntheticSource
from lean.train import cpu_hint, image_repeat_factors, parse_args
from lean.train import main as train_main
from tests.conftest import QUICK, SMALL, cli, one_line, run_train


def small_model(seed=0):
    torch.manual_seed(seed)
    return create_model(ModelSpec("mobilenet_v3_fpn", min_size=96, max_size=160, pretrained=False))


def test_validation_losses_change_no_weight_statistic_or_random_state(cache):
    model = small_model().train()  # from scratch: BatchNorm live, its statistics updated by any training forward
    before = {key: value.clone() for key, value in model.state_dict().items()}
    loader = Loader(cache, 2, shuffle=False, device="cpu", indices=range(4), flip=False, dtype=torch.uint8)
    random_state = torch.get_rng_state()
    losses = validation_losses(model, loader, None)
    assert torch.equal(random_state, torch.get_rng_state()) and model.training
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    names = {"classifier", "box_reg", "mask", "objectness", "rpn_box_reg"}
    assert set(losses) == {"val_loss"} | {f"val_loss_{name}" for name in names}
    assert abs(losses["val_loss"] - sum(value for name, value in losses.items() if name != "val_loss")) < 1e-6
    assert losses == validation_losses(model, loader, None)  # the same regions sampled every time


def test_a_few_steps_lower_the_loss(tiny):
    model = small_model()
    model.train()
    images, targets = next(iter(Loader(Cache(tiny), 2, shuffle=False, device="cpu", train=False, dtype=torch.uint8)))
    optimizer = make_optimizer(model, 0.005)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    totals = [float(train_step(model, images, targets, optimizer, scheduler, scaler, None)[0][0]) for _ in range(12)]
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3]), totals  # averaged: the sampled regions make single steps noisy


# --- the command: resume, failure, signals -------------------------------------------------------


def test_eval_every_k_epochs_and_after_the_last_with_adamw(tiny, tmp_path, capsys):
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-compile", "--amp", "off", "--epochs", "3",
            "--eval-every", "2", "--optimizer", "adamw", "--lr", "1e-4", "--out", str(tmp_path)]  # fmt: skip
    assert run_train(argv, capsys)[0] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records if "segm" in record] == [1, 2]
    optimizer = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    assert "exp_avg" in next(iter(optimizer["state"].values()))  # AdamW's moments: resume restores them


class _FakeLoader(SimpleNamespace):
    def __len__(self):
        return 20


def test_eta_after_resume_counts_only_the_iterations_of_this_run(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr("lean.monitor.time.perf_counter", lambda: clock[0])
    loader = _FakeLoader(batch_size=2, device=torch.device("cpu"), wait_seconds=0.0)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.005}])
    process = SimpleNamespace(distributed=False, main=True, world_size=1)
    monitor = Monitor(loader, optimizer, process, log_every=5, total_iterations=100, start_iteration=90)
    log = TrainingLog()
    for iteration in range(91, 96):  # resumed at 90: five iterations of 2 s each, five to go
        clock[0] += 2.0
        log.window(monitor.add(4, iteration - 81, iteration, torch.zeros(2), ["loss_mask"]))
    assert "eta: 0:00:10" in capsys.readouterr().out.splitlines()[-1]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    common = ["--cache", str(tiny), *SMALL, *"--test-size 2 --no-compile --no-eval --out".split(), str(tmp_path)]
    assert run_train([*common, "--epochs", "1"], capsys)[0] == 0
    good = (tmp_path / "last.pt").read_bytes()

    def poisoned(*args, **kwargs):
        model = create_model(*args, **kwargs)
        calls = []

        def poison(module, inputs, output):  # the second step's mask loss turns to NaN
            calls.append(1)
            if len(calls) == 2 and module.training:
                output[1]["loss_mask"] = output[1]["loss_mask"] * float("nan")
            return output

        model.roi_heads.register_forward_hook(poison)
        return model

    monkeypatch.setattr("lean.train.create_model", poisoned)
    status, _, stderr = run_train([*common, "--epochs", "2", "--resume"], capsys)
    assert status == 3
    assert "non-finite loss at iteration 6" in stderr and "loss_mask=nan" in stderr
    assert (tmp_path / "last.pt").read_bytes() == good


def test_sigint_saves_where_it_stopped_and_resume_finishes(tiny, tmp_path):
    command = [
        sys.executable,
        *"-m lean.train --cache".split(),
        str(tiny),
        *SMALL,
        *"--test-size 2 --no-compile --no-eval --epochs 2 --log-every 1 --out".split(),
        str(tmp_path),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("Epoch: [0]  [2/4]"):
            process.send_signal(2)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by signal" in stdout and "Traceback" not in stderr
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["batch"] == state["iteration"] >= 2
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 8


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["--eval-every", "0"], "--eval-every: must be at least 1"),
        (["--weight-decay", "-1"], "--weight-decay: must be a number, not negative, not -1.0"),
        (["--lr", "nan"], "--lr: must be a positive number, not nan"),
        (["--clip-grad", "inf"], "--clip-grad: must be a positive number, not inf"),
        (["--lr", "0"], "--lr: must be a positive number, not 0.0"),
        (["--optimizer", "adam"], "--optimizer: invalid choice"),
        (["--resume"], "--resume: needs --out"),
        (["--amp", "fp16", "--device", "cpu"], "fp16 is for CUDA"),
        (["--compile", "graphs", "--device", "cpu"], "graphs is for CUDA"),
        (["--cache", "nowhere.h5"], "nowhere.h5: no such file"),
        (["--patience", "0"], "--patience: must be at least 1"),
        (["--ema", "1"], "--ema: must be between 0 and 1"),
        (["--repeat-factor", "0"], "--repeat-factor: must be a positive number, not 0.0"),
        (["--augment", "mosaic"], "--augment: invalid choice"),
        (["--ema", "nan"], "--ema: must be between 0 and 1"),
        (["--patience", "2", "--no-eval"], "--patience: counts evaluations, and --no-eval leaves none"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, reason):
    status, _, stderr = run_train(argv, capsys)
    assert status == 2 and reason in stderr and len(stderr.strip().splitlines()) == 1


def test_a_test_split_that_leaves_nothing_to_train_on_is_one_line(tiny, capsys):
    status, _, stderr = run_train(["--cache", str(tiny), "--test-size", "10", "--no-compile"], capsys)
    assert (
        status == 2 and "--test-size: test size 10 leaves no image" in stderr and len(stderr.strip().splitlines()) == 1
    )


def test_bad_weights_files_are_one_line(tmp_path, tiny, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    for weights, reason in (
        (tmp_path / "junk.pt", "not a loadable weights file"),
        (tmp_path / "other.pt", "does not fit"),
        (tmp_path / "missing.pt", "no such file"),
    ):
        status, _, stderr = run_train(
            ["--cache", str(tiny), "--no-compile", "--weights", str(weights), "--out", str(tmp_path / "r")],
            capsys,
        )
        assert status == 2 and reason in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_offline_coco_weights_name_the_alternatives(monkeypatch, tiny, tmp_path, capsys):
    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    status, _, message = run_train(["--cache", str(tiny), "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert status == 2 and len(message.strip().splitlines()) == 1
    assert "cannot download the COCO weights" in message and "--weights none" in message and "--weights FILE" in message


def test_compiled_backbone_does_not_recompile_for_a_second_batch_of_the_same_bucket(tiny):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = small_model()
    model.transform.canvas_ladder = canvas_ladder(96, 160)  # as tune_for_speed sets it
    model.train()
    # Whether a call recompiles is decided by dynamo's guards, before any backend runs; aot_eager checks
    # the same guards in seconds where inductor's code generation takes minutes on two cores.
    model.backbone.compile(dynamic=False, backend="aot_eager")
    loader = Loader(Cache(tiny), 1, shuffle=False, device="cpu", train=False, dtype=torch.uint8)
    batches = list(loader)
    shapes = [model.transform(images, targets)[0].tensors.shape for images, targets in batches]
    first, second = next(
        (i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes)) if shapes[i] == shapes[j]
    )
    optimizer = make_optimizer(model, 0.001)
    scheduler = make_scheduler(optimizer, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, *batches[first], optimizer, scheduler, scaler, None)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    train_step(model, *batches[second], optimizer, scheduler, scaler, None)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_is_opt_in_on_every_device_and_cuda_pads_to_canvases_by_default():
    assert Speed.for_device(torch.device("cpu"), compile=parse_args(["--device", "cpu"]).compile).compile == "off"
    cuda = Speed.for_device(torch.device("cuda"), compile=None)
    assert cuda.compile == "off" and cuda.canvases
    assert not Speed.for_device(torch.device("cpu")).canvases
    assert parse_args(["--device", "cpu", "--compile"]).compile == "inductor"
    assert parse_args(["--device", "cpu", "--no-compile"]).compile == "off"


def test_channels_last_is_on_by_default_where_bf16_is(tiny, tmp_path, capsys, monkeypatch):
    assert channels_last_is_fast(torch.device("cuda"))
    for fast in (False, True):
        monkeypatch.setattr("lean.speed.bf16_is_fast", lambda device, fast=fast: fast)
        assert channels_last_is_fast(torch.device("cpu")) is fast
        argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--no-eval", "--max-iters", "1", "--amp", "off"]
        status, stdout, _ = run_train([*argv, "--out", str(tmp_path / str(fast))], capsys)
        assert status == 0 and f"channels-last {fast}," in stdout
    status, stdout, _ = run_train([*argv, "--no-channels-last", "--out", str(tmp_path / "off")], capsys)
    assert status == 0 and "channels-last False," in stdout


def test_evaluation_during_a_compiled_run_compiles_nothing(tiny, tmp_path, capsys, monkeypatch):
    from torch._dynamo.utils import counters

    import lean.evaluate

    def tune_quickly(model, speed):  # aot_eager: dynamo's guards, no codegen
        model.backbone.compile(dynamic=False, backend="aot_eager")
        return model

    real_predict_split = lean.evaluate.predict_split
    graphs_during_evaluation = []

    def counted(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        predictions = real_predict_split(*args, **kwargs)
        graphs_during_evaluation.append(counters["stats"]["unique_graphs"] - before)
        return predictions

    monkeypatch.setattr("lean.model.tune_for_speed", tune_quickly)
    monkeypatch.setattr("lean.evaluate.predict_split", counted)
    torch._dynamo.reset()
    argv = [
        "--cache",
        str(tiny),
        *SMALL,
        *"--test-size 4 --amp off --compile --max-iters 1 --out".split(),
        str(tmp_path),
    ]
    status, stdout, _ = run_train(argv, capsys)
    assert status == 0
    assert counters["stats"]["unique_graphs"] >= 1  # training did compile
    assert graphs_during_evaluation == [0]
    windows = [
        json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "compile_s" in line
    ]
    assert windows and windows[0]["compile_s"] > 0 and windows[0]["graphs_compiled"] >= 1
    assert " s compiling)" in stdout


# --- DDP -----------------------------------------------------------------------------------------


def _ddp_worker(rank, world_size, cache_path, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = small_model(seed=0)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loader = Loader(Cache(cache_path), 2, seed=0, device="cpu", rank=rank, world_size=world_size, dtype=torch.uint8)
        optimizer = make_optimizer(ddp, 0.01)
        scheduler = make_scheduler(optimizer, len(loader))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        seen = []
        for images, targets in loader:
            seen += [int(t["image_id"]) for t in targets]
            train_step(ddp, images, targets, optimizer, scheduler, scaler, None)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        results[rank] = (all(torch.equal(gathered[0], g) for g in gathered), seen, float(flat.abs().sum()))
    finally:
        dist.destroy_process_group()


def test_two_ddp_processes_keep_identical_weights_on_disjoint_shards(tiny):
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tiny), port, results), nprocs=2, join=True)
        (same0, seen0, _), (same1, seen1, _) = results[0], results[1]
    assert same0 and same1
    assert not set(seen0) & set(seen1) and sorted(seen0 + seen1) == list(range(10))


def test_torchrun_trains_with_two_processes_on_three_classes_only_rank_0_writes_and_nothing_warns(tmp_path):
    classes = build(SyntheticSource(10, seed=11, classes=3), tmp_path / "classes.h5", workers=0, progress=False)
    command = [
        sys.executable,
        *"-m torch.distributed.run --standalone --nproc_per_node=2 -m lean.train --cache".split(),
        str(classes),
        *SMALL,
        *"--no-channels-last --test-size 2 --no-compile --no-eval --max-iters 2 --out".split(),
        str(tmp_path / "ddp"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun warns when it has to set this itself
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr[-2000:]
    assert result.stdout.count("training mobilenet_v3_fpn") == 1  # rank 0 alone logs
    assert "x 2 process(es)" in result.stdout
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert state["iteration"] == 2 and state["model_spec"]["class_names"] == ["person", "disc", "triangle"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--clip-grad=-1"], ["--clip-grad", "positive"]),
        (["--clip-grad", "0"], ["--clip-grad", "positive"]),
        (["--max-iters", "0"], ["--max-iters", "at least 1"]),
        (["--max-iters=-5"], ["--max-iters", "at least 1"]),
        (["--seed=-1"], ["--seed", "negative"]),
        (["--test-size", "0"], ["--test-size", "at least 1"]),
        (["--canvas-levels", "0"], ["--canvas-levels", "at least 1"]),
        (["--min-size", "900", "--max-size", "800"], ["--min-size", "--max-size"]),
    ],
)
def test_every_numeric_training_argument_is_checked_in_one_line(argv, words, capsys):
    status, _, stderr = cli(train_main, argv, capsys)
    assert one_line(status, stderr, *words), stderr


def test_a_bad_cache_leaves_no_output_folder(tmp_path, capsys):
    status, _, _ = cli(
        train_main, ["--cache", str(tmp_path / "missing.h5"), *QUICK, "--out", str(tmp_path / "r")], capsys
    )
    assert status == 2 and not (tmp_path / "r").exists()


def test_sigterm_during_the_last_evaluation_says_it_stopped(tiny, tmp_path, capsys, monkeypatch):
    import lean.train

    real = lean.train.predict

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr("lean.train.predict", interrupted)
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--epochs", "1", "--out", str(tmp_path / "r")]
    status, stdout, _ = cli(train_main, argv, capsys)
    assert status == 143 and "stopped by signal" in stdout


def test_on_a_cpu_the_tutorials_sizes_come_with_a_line_of_what_to_expect():
    cpu = torch.device("cpu")
    assert "mobilenet_v3_fpn" in cpu_hint(parse_args(["--device", "cpu"]), cpu)
    assert cpu_hint(parse_args(["--device", "cpu", "--backbone", "mobilenet_v3_fpn"]), cpu) is None
    assert cpu_hint(parse_args(["--device", "cpu", "--max-size", "512", "--min-size", "320"]), cpu) is None


def test_the_model_is_sized_from_the_cache_and_the_checkpoint_names_its_classes(trained):
    model, spec, config = load_model(trained / "last.pt", "cpu")
    assert spec.class_names == ("person", "disc", "triangle") and spec.category_ids == (1, 2, 3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # three classes and background
    assert config.val_cache is not None


def test_a_run_with_a_validation_cache_evaluates_all_of_it_per_class(trained, three_classes):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    per_class = [record["per_class"] for record in records if "per_class" in record]
    assert len(per_class) == 1 and set(per_class[0]["segm"]) == {"person", "disc", "triangle"}


def test_a_validation_cache_of_other_classes_is_one_line(three_classes, tmp_path, capsys):
    train, _ = three_classes
    other = build(SyntheticSource(4, seed=2, classes=2), tmp_path / "other.h5", workers=0, progress=False)
    argv = ["--cache", str(train), "--val-cache", str(other), *SMALL, "--max-iters", "1", "--out", str(tmp_path / "r")]
    status, _, stderr = cli(train_main, argv, capsys)
    assert status == 2 and "--val-cache" in stderr and "are not the training cache's" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_an_image_too_thin_for_the_sizes_is_one_line_before_any_work(tmp_path, capsys):
    from lean.cache import build
    from lean.coco import CocoSource
    from tests.coco_files import annotation, dataset, polygon, write_coco

    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "thin.png", "width": 3, "height": 1000}]  # fmt: skip
    instances = [annotation(1), annotation(2, image_id=2, segmentation=[polygon(0, 5, 3, 100)], bbox=[0, 5, 3, 100])]
    cache = build(CocoSource(write_coco(tmp_path / "d", dataset(instances, images))), tmp_path / "c.h5",
                  workers=0, progress=False)  # fmt: skip
    out = tmp_path / "run"
    status, _, stderr = run_train(["--cache", str(cache), *QUICK, "--test-size", "1", "--out", str(out)], capsys)
    assert one_line(status, stderr, "thin.png", "too thin for sizes 96/160", "3 x 1000") and not out.exists()


def test_a_split_error_names_the_flag_the_user_gave_or_the_cache(tmp_path, capsys):
    from lean.cache import build
    from lean.synthetic import SyntheticSource

    one = build(SyntheticSource(1, seed=0), tmp_path / "one.h5", workers=0, progress=False)
    status, _, stderr = run_train(["--cache", str(one), *SMALL, "--out", str(tmp_path / "r")], capsys)
    assert one_line(status, stderr, f"--cache {one}:", "leaves no image") and "--test-size" not in stderr


def test_caches_without_an_instance_are_one_line_and_a_validation_cache_is_named_in_the_start_line(
    tiny, tmp_path, capsys
):
    import numpy as np

    from lean.cache import build
    from tests.conftest import ArraySource

    blank = [(np.zeros((32, 40, 3), np.uint8), np.zeros((32, 40), np.uint8)) for _ in range(4)]
    negatives = build(ArraySource(blank), tmp_path / "negatives.h5", workers=0, progress=False)
    status, _, stderr = run_train(["--cache", str(negatives), *QUICK, "--out", str(tmp_path / "a")], capsys)
    assert one_line(status, stderr, "no image has an instance to learn from")
    argv = ["--cache", str(tiny), "--val-cache", str(negatives), *SMALL, "--max-iters", "1"]
    status, _, stderr = run_train([*argv, "--out", str(tmp_path / "b")], capsys)
    assert one_line(status, stderr, "--val-cache", "no AP to measure")
    status, stdout, _ = run_train([*argv, "--no-eval", "--out", str(tmp_path / "c")], capsys)
    assert status == 0 and f"on 10 images (validating on 4 of {negatives})" in stdout


def test_task_detect_trains_a_faster_rcnn_scored_drawn_and_kept_by_its_boxes(tiny, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from lean.evaluate import main as evaluate_main
    from lean.predict import main as predict_main

    out = tmp_path / "run"
    argv = ["--cache", str(tiny), *SMALL, "--task", "detect", "--test-size", "2", "--epochs", "1", "--out", str(out)]
    status, stdout, _ = run_train(argv, capsys)
    assert status == 0 and "IoU metric: bbox" in stdout and "IoU metric: segm" not in stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["model_spec"]["task"] == "detect" and not any("mask" in key for key in state["model"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("bbox" in record for record in records) and not any("segm" in record for record in records)
    assert not any("loss_mask" in record for record in records)
    assert state["best_ap"] == max(record["bbox"][0] for record in records if "bbox" in record)
    status, stdout, _ = cli(evaluate_main, ["--checkpoint", str(out / "last.pt"), "--device", "cpu", "--json",
                                            str(tmp_path / "s.json")], capsys)  # fmt: skip
    assert status == 0 and "IoU metric: segm" not in stdout
    assert set(json.loads((tmp_path / "s.json").read_text())) == {"bbox", "image_ids"}
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "photo.png")
    argv = [str(tmp_path / "photo.png"), "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "pictures"),
            "--score-thresh", "0", "--device", "cpu"]  # fmt: skip
    assert cli(predict_main, argv, capsys)[0] == 0 and (tmp_path / "pictures" / "photo.png").is_file()
    resume = ["--cache", str(tiny), *SMALL, "--task", "segment", "--out", str(out), "--resume"]
    status, _, stderr = run_train(resume, capsys)
    assert one_line(status, stderr, "--task segment differs from the run's detect")


def test_a_cache_of_boxes_alone_trains_a_faster_rcnn_by_default_and_refuses_a_mask_rcnn(tmp_path, capsys):
    boxes = build(SyntheticSource(10, seed=4, boxes_only=True), tmp_path / "boxes.h5", workers=0, progress=False)
    masks = build(SyntheticSource(4, seed=5), tmp_path / "masks.h5", workers=0, progress=False)
    status, _, stderr = run_train(["--cache", str(boxes), *QUICK, "--task", "segment", "--out", str(tmp_path / "a")],
                                  capsys)  # fmt: skip
    assert one_line(status, stderr, f"--cache {boxes}: holds boxes alone", "--task detect")
    argv = ["--cache", str(masks), "--val-cache", str(boxes), *SMALL, "--max-iters", "1", "--out", str(tmp_path / "b")]
    assert one_line(*run_train(argv, capsys)[::2], f"--val-cache {boxes}: holds boxes alone")
    out = tmp_path / "c"
    status, stdout, _ = run_train(["--cache", str(boxes), *SMALL, "--test-size", "2", "--max-iters", "2", "--out",
                                   str(out)], capsys)  # fmt: skip
    assert status == 0 and "IoU metric: bbox" in stdout and "IoU metric: segm" not in stdout
    assert torch.load(out / "last.pt", weights_only=True)["model_spec"]["task"] == "detect"


def test_a_run_with_batched_heads_trains_evaluates_and_resumes_without_them(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["--cache", str(tiny), *SMALL, "--test-size", "2", "--out", str(out)]
    status, stdout, _ = cli(train_main, [*argv, "--epochs", "1", "--batched-heads"], capsys)
    assert status == 0 and "batched heads" in stdout and (out / "best.pt").is_file()
    assert torch.load(out / "last.pt", weights_only=True)["config"]["batched_heads"] is True
    status, stdout, _ = cli(train_main, [*argv, "--epochs", "2", "--resume", "--no-batched-heads"], capsys)
    assert status == 0 and "torchvision's heads" in stdout  # a speed setting: a resumed run may change it


def test_patience_stops_after_k_evaluations_without_a_better_ap_and_resume_has_nothing_left(
    tiny, tmp_path, capsys, monkeypatch
):
    import lean.scoring

    aps = iter([0.2, 0.3, 0.25, 0.28, 0.5])
    monkeypatch.setattr(lean.scoring, "_scored", lambda scoring, results: _report(next(aps)))
    monkeypatch.setattr("lean.train.predict", lambda *_: [])  # no detections to score: _scored gives the APs
    monkeypatch.setattr("lean.train.validation_losses", lambda *_: {"val_loss": 1.0})
    common = ["--cache", str(tiny), *SMALL, "--test-size", "6", "--epochs", "5", "--out", str(tmp_path)]
    status, stdout, _ = run_train([*common, "--patience", "2"], capsys)
    assert status == 0 and "stopping early: 2 evaluations without a better segm AP than 0.3000" in stdout
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 4 and state["best_ap"] == 0.3 and state["evaluations_since_best"] == 2
    stopped = (tmp_path / "last.pt").read_bytes()
    status, stdout, _ = run_train([*common, "--resume"], capsys)
    assert status == 0 and "nothing left to do (--patience 2)" in stdout
    assert (tmp_path / "last.pt").read_bytes() == stopped
    status, stdout, _ = run_train([*common, "--resume", "--patience", "3"], capsys)  # more patience: one more epoch
    assert status == 0 and "stopping early" not in stdout
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best_ap"] == 0.5


def _report(ap):
    """A scorer's (report, text) with main AP `ap`: what --patience reads."""
    values = {"AP": ap, "stats": [ap] * 12, "per_class": {}, "pr_curves": {}}
    matrix = {"iou": 0.5, "score_thresh": 0.25, "labels": ["person", "background"], "matrix": [[0, 0], [0, 0]]}
    return {"bbox": {**values, "confusion": matrix}, "segm": values}, f"AP {ap}"


def test_the_weights_average_follows_the_model_on_its_ramp_and_swaps_in_and_out_whole():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightsEMA(model, decay=0.99)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()  # the ramp: decay min(0.99, 2 / 11) after one update
    weight = ema.averaged(model.state_dict())["0.weight"]
    assert torch.allclose(weight, start["0.weight"] + 9 / 11, atol=1e-6)
    assert ema.names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]  # no counter
    trained = model[0].weight.clone()
    with ema.applied():
        assert torch.equal(model[0].weight, weight)
    assert torch.equal(model[0].weight, trained)


def test_repeat_factor_sampling_repeats_the_rare_class_and_says_how_much(three_classes, tmp_path, capsys):
    cache = Cache(three_classes[0])
    factors = image_repeat_factors(cache, range(len(cache)), 0.9)
    assert factors.max() > 1  # some class is in fewer than 90 % of the images
    argv = ["--cache", str(three_classes[0]), *QUICK, "--test-size", "1", "--repeat-factor", "0.9", "--max-iters", "1"]
    status, stdout, _ = run_train([*argv, "--out", str(tmp_path)], capsys)
    assert status == 0 and "--repeat-factor 0.9): images taken x1 to x" in stdout
