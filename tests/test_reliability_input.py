"""Reliability items 5, 7, 8, 9 and 10 (docs/reliability.md): bad input ends in one line on stderr
and exit code 2 (a ManidpError), or in a correct recovery, with nothing left behind."""

import gzip
import json
import math
import os
import re
import shutil
import signal
import struct

import numpy as np
import pytest
import torch
from helpers import run_main, write_cifar, write_fashion_mnist_idx
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from manidp_cli.cli import app
from manidp_cli.cli.render import one_line
from manidp_cli.errors import DataError, ManidpError, RecipeError, TrainingError, WeightsError

runner = CliRunner()
LONG = "x" * 300  # one path component longer than NAME_MAX: stat() raises ENAMETOOLONG


def tiny_train(data, out, **overrides):
    from manidp_cli.api.jobs import prepare

    settings = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "train_images": 64, "data": data, **overrides}
    return prepare("train", "test_resnet", overrides=settings, out_dir=out)


# ---------------------------------------------------------------- item 5: non-finite training


def test_nan_starting_weights_are_refused_before_anything_is_written(dense_weights, tiny_fashion, tmp_path):
    from manidp_cli.api.jobs import prepare

    state = load_file(str(dense_weights))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[name][0, 0, 0, 0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_file(state, str(broken))
    with pytest.raises(WeightsError, match=f"non-finite values.*{name}"):
        prepare(
            "prune",
            "test_resnet",
            overrides={"data": tiny_fashion, "target_flops": 0.5},
            weights=broken,
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lr", ["inf", "nan", "0"])
def test_learning_rates_that_cannot_train_are_refused(monkeypatch, capsys, tmp_path, lr):
    # --lr 0 used to be dropped (`if lr`) and the run silently used 0.05
    code, lines = run_main(monkeypatch, capsys, "train", "test_resnet", "--lr", lr, "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1 and "'optimizer.lr'" in lines[0], lines
    assert not (tmp_path / "out").exists()


class _NaNAt:
    """Cross-entropy whose loss turns NaN at one (epoch, step): a diverging run, deterministically."""

    def __init__(self, epoch, step):
        from manidp_cli.training.objectives import CrossEntropyObjective

        self.inner, self.at, self.calls = CrossEntropyObjective(), (epoch, step), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, model, images, targets):
        logits, terms = self.inner.step(model, images, targets)
        self.calls += 1
        if divmod(self.calls - 1, 2) == self.at:  # two steps per epoch below
            terms["loss"] = terms["loss"] * float("nan")
        return logits, terms


def _small_model():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def _fit(data, objective, checkpoint, **extra):
    from manidp_cli.config import OptimizerConfig
    from manidp_cli.training.engine import fit

    return fit(
        _small_model(),
        data,
        objective,
        epochs=3,
        batch_size=32,
        optimizer_config=OptimizerConfig(),
        train_limit=64,
        checkpoint_path=checkpoint,
        extra_state={"kind": "train"},
        **extra,
    )


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_fashion, tmp_path):
    from manidp_cli.core.state import non_finite_tensors
    from manidp_cli.data import load_data
    from manidp_cli.training.objectives import CrossEntropyObjective

    data = load_data(tiny_fashion)
    checkpoint = tmp_path / "checkpoint.pt"
    stops = {"after_first_epoch": None}

    def remember(metrics):  # the checkpoint of epoch 1 as written
        stops["after_first_epoch"] = checkpoint.read_bytes()

    with pytest.raises(
        TrainingError, match=r"the loss is nan at epoch 2, step 2 .*learning rate.*last good checkpoint"
    ):
        _fit(data, _NaNAt(1, 1), checkpoint, on_epoch=remember)
    assert checkpoint.read_bytes() == stops["after_first_epoch"]  # not replaced by the broken state
    assert not non_finite_tensors(torch.load(checkpoint, weights_only=True)["model"])

    def poison(info):  # finite loss, but the last step of epoch 1 leaves NaN weights
        if info.step == info.steps:
            next(iter(_poisoned["model"].parameters())).data.fill_(float("nan"))

    other = tmp_path / "other.pt"
    from manidp_cli.config import OptimizerConfig
    from manidp_cli.training.engine import fit

    _poisoned = {"model": _small_model()}
    with pytest.raises(
        TrainingError, match="weights became non-finite .* by the end of epoch 1.*no checkpoint had been written"
    ):
        fit(
            _poisoned["model"],
            data,
            CrossEntropyObjective(),
            epochs=2,
            batch_size=32,
            optimizer_config=OptimizerConfig(),
            train_limit=64,
            checkpoint_path=other,
            on_step=poison,
            extra_state={},
        )
    assert not other.exists()


def test_diverging_run_is_one_line_and_leaves_nothing(monkeypatch, capsys, tiny_fashion, tmp_path):
    out = tmp_path / "out"
    code, lines = run_main(
        monkeypatch,
        capsys,
        "train",
        "test_resnet",
        "--data",
        tiny_fashion,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "1e30",
        "--out",
        str(out),
    )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: training stopped: the loss is nan at epoch 1") and "no checkpoint" in lines[0]
    assert not out.exists()  # the folder this run made, with its recipe.yaml, is gone


# ---------------------------------------------------------------- item 7: YAML alias bombs


def _nested_aliases(levels, width, leaf_count=10):
    lines = [f"l0: &l0 [{', '.join(['x'] * leaf_count)}]"]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    lines.append(f"epochs: *l{levels}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (_nested_aliases(7, 10), "more than 32 aliases"),  # 10^8 leaves from ~450 bytes
        (_nested_aliases(6, 3, leaf_count=20), "more than 10000 values"),  # 18 aliases, 14580 leaves
        ("a: &a [*a]\n", "an alias that contains itself"),
        ("epochs: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ],
    ids=["alias-bomb", "wide-expansion", "self-alias", "deep-nesting"],
)
def test_yaml_beyond_the_budget_is_refused_with_a_short_message(tmp_path, text, message):
    from manidp_cli.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert len(text) < 7000
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(path)
    assert len(str(error.value)) < 400


def test_a_few_aliases_are_still_fine_and_echoed_values_are_capped(tmp_path):
    from manidp_cli.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("base: &lr 0.2\n")
    with pytest.raises(RecipeError, match="unknown key 'base'"):
        load_recipe(path)
    path.write_text("optimizer: &o {lr: 0.2}\n")
    assert load_recipe(path).optimizer.lr == 0.2
    path.write_text(_nested_aliases(2, 10))  # 21 aliases, about 2,200 values: allowed, then refused by type
    with pytest.raises(
        RecipeError, match=r"'epochs': Input should be a valid integer \(got \[\[\['x', .*\.\.\. \(\d+ characters\)\)"
    ) as error:
        load_recipe(path)
    assert len(str(error.value)) < 600


def test_recipe_files_that_are_not_small_utf8_text(tmp_path):
    from manidp_cli.config import MAX_RECIPE_BYTES, load_recipe

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_recipe(latin)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(RecipeError, match="a recipe is a small YAML file"):
        load_recipe(big)


# ---------------------------------------------------------------- item 8: resume


@pytest.fixture(scope="module")
def interrupted_train(tiny_fashion, tmp_path_factory):
    """A `manidp train` run stopped after one finished epoch: a checkpoint and no export."""
    from manidp_cli.api.jobs import run

    out = tmp_path_factory.mktemp("interrupted") / "run"
    result = run(tiny_train(tiny_fashion, out), on_step=lambda info: info.epoch == 1 and info.step == 1)
    assert result.interrupted and (out / "checkpoint.pt").is_file()
    return out


@pytest.mark.parametrize(
    "args, named",
    [
        (["resnet18"], "MODEL (run: test_resnet, given: resnet18)"),
        (["--epochs", "3"], "--epochs (run: 2, given: 3)"),
        (["--lr", "0.1"], "--lr (run: 0.05, given: 0.1)"),
        (["--seed", "1", "--batch-size", "16"], "--batch-size (run: 32, given: 16); --seed (run: 0, given: 1)"),
        (["--weights", "w.safetensors"], "--weights (the run started from random init)"),
        (["--img-size", "48"], "--img-size (run: None, given: 48)"),
    ],
)
def test_resume_refuses_settings_that_differ_from_the_run(interrupted_train, args, named):
    before = sorted(p.name for p in interrupted_train.iterdir())
    result = runner.invoke(app, ["train", *args, "--resume", "--out", str(interrupted_train)])
    assert isinstance(result.exception, ManidpError), result.output
    assert "--resume continues the run" in str(result.exception) and named in str(result.exception)
    assert sorted(p.name for p in interrupted_train.iterdir()) == before


def test_resume_refuses_recipe_keys_that_differ(interrupted_train, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\noptimizer:\n  momentum: 0.5\n")  # epochs equal: only momentum is named
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--resume", "--out", str(interrupted_train)])
    assert isinstance(result.exception, ManidpError)
    assert "these differ: optimizer.momentum (run: 0.9, given: 0.5)." in str(result.exception)


def test_documented_resume_command_needs_no_model(interrupted_train, tiny_fashion, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted_train, out)
    # prune without MODEL gets past argument parsing to the checkpoint, which belongs to `train`
    result = runner.invoke(app, ["prune", "--resume", "--out", str(out)])
    assert isinstance(result.exception, ManidpError) and "belongs to a `manidp train` run" in str(result.exception)
    # the same value as the run is not a difference; loader workers may change (another machine)
    args = ["--data", tiny_fashion, "--epochs", "2", "-j", "0"]
    result = runner.invoke(app, ["train", "--resume", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and "workers: 0" in (out / "recipe.yaml").read_text()


# ---------------------------------------------------------------- item 9: one line instead of a traceback


def test_error_printer_handles_empty_multiline_and_markup_messages(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise ManidpError("first [/bold] line\nsecond line " + "y" * 5000)

    monkeypatch.setattr("manidp_cli.api.prepare", fail)
    code, lines = run_main(monkeypatch, capsys, "train", "test_resnet")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: first [/bold] line second line yyy") and lines[0].endswith("characters)")
    assert len(lines[0]) < 1100
    assert one_line(EOFError()) == "EOFError"


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "x", "--epochs", "0"], "Invalid value for '--epochs'"),
        (["prune", "x", "--target-flops", "abc"], "Invalid value for '--target-flops'"),
        (["train", "x", "--seed", "1e23"], "Invalid value for '--seed'"),
        (["trian"], "No such command 'trian'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, args, message):
    code, lines = run_main(monkeypatch, capsys, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "--help" in lines[0]


def test_zero_byte_weights_and_checkpoint(tmp_path, tiny_fashion):
    from manidp_cli.api.jobs import prepare

    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(WeightsError, match=r"cannot read weights .*empty.pth: EOFError"):
        prepare("train", "test_resnet", overrides={"data": tiny_fashion}, weights=empty, out_dir=tmp_path / "out")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").touch()
    with pytest.raises(ManidpError, match=r"cannot read checkpoint .*checkpoint.pt: EOFError"):
        prepare("train", None, out_dir=run_dir, resume=True)


def test_incomplete_or_non_finite_checkpoints_are_refused(interrupted_train, tmp_path):
    from manidp_cli.training.checkpoint import load_checkpoint

    state = torch.load(interrupted_train / "checkpoint.pt", weights_only=True)
    broken = tmp_path / "checkpoint.pt"
    torch.save({**state, "extra": {"kind": "train"}}, broken)
    with pytest.raises(ManidpError, match=r"incomplete manidp checkpoint \(missing extra.recipe"):
        load_checkpoint(broken)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].fill_(float("nan"))
    torch.save(state, broken)
    with pytest.raises(ManidpError, match=f"non-finite weights \\({first}\\)"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "test_resnet", "--weights", f"/tmp/{LONG}.pth"],
        ["train", "test_resnet", "--recipe", f"/tmp/{LONG}.yaml"],
        ["train", "test_resnet", "--out", f"/tmp/{LONG}"],
        ["train", "test_resnet", "--data", f"imagefolder:/tmp/{LONG}"],
        ["train", "test_resnet", "--data", f"cifar10:/tmp/{LONG}"],
        ["train", "test_resnet", "--data", f"fashion-mnist:/tmp/{LONG}"],
        ["train", "--resume", "--out", f"/tmp/{LONG}"],
        ["eval", f"/tmp/{LONG}"],
        ["report", f"/tmp/{LONG}"],
    ],
    ids=["weights", "recipe", "out", "imagefolder", "cifar", "fashion", "resume", "eval", "report"],
)
def test_over_long_paths_are_one_line(monkeypatch, capsys, tmp_path, args):
    monkeypatch.chdir(tmp_path)
    code, lines = run_main(monkeypatch, capsys, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "File name too long" in lines[0] or "not found" in lines[0] or "unknown model" in lines[0], lines
    assert len(lines[0]) < 700 and list(tmp_path.iterdir()) == []


def test_seeds_outside_32_bits_are_refused(tmp_path):
    from manidp_cli.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("seed: 1.0e+23\n")  # torch.manual_seed raised "Overflow when unpacking long"
    with pytest.raises(RecipeError, match=r"'seed': .* \(got 1e\+23\)"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="'seed': Input should be less than or equal to 4294967295"):
        load_recipe(None, {"seed": 2**32})
    with pytest.raises(RecipeError, match="'seed': Input should be greater than or equal to 0"):
        load_recipe(None, {"seed": -1})
    assert load_recipe(None, {"seed": 2**32 - 1}).seed == 2**32 - 1


def _image_folder(root, classes=("a", "b"), bad=None):
    """DIR/{train,val}/<class>/*.png, two tiny images per class; ``bad`` = (split, class) gets a
    file that is not an image."""
    from PIL import Image

    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * index + i, dtype=np.uint8)).save(folder / f"{i}.png")
    if bad is not None:
        (root / bad[0] / bad[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return f"imagefolder:{root}"


@pytest.mark.parametrize("split", ["train", "val"])
def test_corrupt_image_is_named_and_the_run_leaves_nothing(tmp_path, split):
    from manidp_cli.api.jobs import run

    data = _image_folder(tmp_path / "images", bad=(split, "b"))
    out = tmp_path / "out"
    job = tiny_train(data, out, epochs=1, batch_size=8, train_images=None)
    with pytest.raises(DataError, match=r"^cannot read image .*broken.jpg: \S") as error:
        run(job)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert not out.exists()  # recipe.yaml written at the start is removed with the folder


def test_one_class_image_folder_is_refused(tmp_path):
    from manidp_cli.data import load_data

    with pytest.raises(DataError, match=r"has 1 class folder \(only\); classification needs at least 2"):
        load_data(_image_folder(tmp_path, classes=("only",)), "test_resnet")


def test_cifar_labels_beyond_the_classes(tmp_path):
    from manidp_cli.data import load_data

    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    write_cifar(tmp_path / "c", names, 1, count=4, classes=12)
    with pytest.raises(DataError, match=r"CIFAR-10 file .*: label 1[01] found, but there are 10 classes"):
        load_data(f"cifar10:{tmp_path / 'c'}")


def _fashion_copy(tiny_fashion, tmp_path):
    source = tiny_fashion.split(":", 1)[1]
    target = tmp_path / "fm"
    shutil.copytree(source, target)
    return target


def _rewrite_images(folder, count, data):
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, count, 28, 28) + data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes, not gzip"), "Not a gzipped file"),
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                (d / "train-images-idx3-ubyte.gz").read_bytes()[:-9]
            ),
            "Compressed file ended before the end-of-stream marker was reached",
        ),
        (
            lambda d: _rewrite_images(d, 3, bytes(2 * 784 + 5)),
            "its header announces 3 x 28 x 28 bytes of data, the file holds 1573",
        ),
        (lambda d: write_fashion_mnist_idx(d, np.zeros((0, 28, 28)), [], "train"), "holds no images"),
        (
            lambda d: write_fashion_mnist_idx(d, np.zeros((2, 28, 28)), [3, 10], "train"),
            "label 10 found, but there are 10 classes",
        ),
        (
            lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(struct.pack(">II", 2051, 1) + b"\x00")
            ),
            "not an IDX label file (magic number 2051, expected 2049)",
        ),
    ],
    ids=["not-gzip", "truncated-gzip", "odd-size", "no-images", "label-10", "wrong-magic"],
)
def test_damaged_fashion_mnist_files(tiny_fashion, tmp_path, damage, message):
    from manidp_cli.data import load_data

    folder = _fashion_copy(tiny_fashion, tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=re.escape(message)):
        load_data(f"fashion-mnist:{folder}")


def test_unusable_out_is_refused_before_any_work(monkeypatch, tmp_path):
    from manidp_cli.api import jobs as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(pipeline, "load_data", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in [(a_file, "is a file, not a folder"), (a_file / "sub" / "run", "file is a file, not a folder")]:
        with pytest.raises(ManidpError, match=message):
            pipeline.prepare("train", "test_resnet", out_dir=out)
    monkeypatch.setattr("manidp_cli.inputs.os.access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(ManidpError, match="is not writable"):
        pipeline.prepare("train", "test_resnet", out_dir=tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------- item 9: export metadata and report.json

GOOD_METADATA = {
    "kind": "dense",
    "model": "test_resnet",
    "model_kwargs": {"num_classes": 10, "in_chans": 1},
    "input_shape": [1, 32, 32],
    "data": {"spec": "embedded"},
}


def _export_with(tmp_path, metadata):
    path = tmp_path / "model.safetensors"
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"manidp": text})
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ("{not json", "is not valid JSON"),
        ({"model": None}, "needs 'kind' .* and 'model'"),
        ({"model": "resnet343"}, "names unknown model 'resnet343'; did you mean"),
        (
            {"model_kwargs": {"num_classes": 10**9, "in_chans": 1}},
            r"model_kwargs.num_classes must be between 1 and 100000, got 1000000000",
        ),
        ({"model_kwargs": {"num_classes": 1e9, "in_chans": 1}}, "model_kwargs.num_classes must be between"),
        (
            {"model_kwargs": {"num_classes": 10, "in_chans": 1, "checkpoint_path": "/etc/passwd"}},
            r"sets model_kwargs \['checkpoint_path'\]; only num_classes, in_chans, drop_rate, drop_path_rate",
        ),
        ({"model_kwargs": {"num_classes": 10}}, "must hold num_classes and in_chans"),
        ({"input_shape": [3, 32, 32]}, r"'input_shape' must be \[in_chans, H, W\]"),
        ({"kind": "pruned", "gated_layers": [], "gate_policy": {"reduction": 0}}, "invalid 'gate_policy'"),
        ({"kind": "pruned", "gate_policy": {}}, "'gated_layers' must be a list"),
        ({"data": "embedded"}, "'data' must be an object"),
    ],
)
def test_export_metadata_is_checked_before_a_model_is_built(tmp_path, change, message):
    from manidp_cli.io import load_pruned, read_metadata

    assert read_metadata(_export_with(tmp_path, GOOD_METADATA)) == GOOD_METADATA  # the base is fine
    metadata = change if isinstance(change, str) else {**GOOD_METADATA, **change}
    path = _export_with(tmp_path, metadata)
    for reader in (read_metadata, load_pruned):
        with pytest.raises(WeightsError, match=message):
            reader(path)


def test_corrupt_or_foreign_report_json(pruned, tmp_path):
    from manidp_cli.analysis.report import flops_report

    export = tmp_path / "export"
    shutil.copytree(pruned.out_dir, export)
    stored = json.loads((export / "report.json").read_text())
    assert flops_report(export).model == "test_resnet"
    (export / "report.json").write_text('{"measured": ')
    with pytest.raises(ManidpError, match=r"report.json is corrupt \(JSONDecodeError"):
        flops_report(export)
    (export / "report.json").write_text(json.dumps({**stored, "model": "resnet18"}))
    with pytest.raises(ManidpError, match="report.json does not belong to the export beside it"):
        flops_report(export)
    del stored["measured"]["layers"]
    (export / "report.json").write_text(json.dumps(stored))
    with pytest.raises(ManidpError, match=r"report.json is corrupt \(KeyError: 'layers'\)"):
        flops_report(export)


# ---------------------------------------------------------------- item 10: Ctrl-C


def test_ctrl_c_before_the_first_step_says_nothing_is_saved(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("manidp_cli.api.jobs.load_data", interrupted)
    result = runner.invoke(app, ["train", "test_resnet", "--out", str(tmp_path / "out")])
    assert result.exit_code == 130
    assert "interrupted before the first checkpoint: nothing to resume" in result.output
    assert not (tmp_path / "out").exists()


def test_second_ctrl_c_keeps_the_last_checkpoint_and_says_so(monkeypatch, tiny_fashion, tmp_path):
    from manidp_cli import api
    from manidp_cli.api import jobs as pipeline

    real_run = pipeline.run

    def run_and_press_ctrl_c_twice(job, on_step=None, on_epoch=None):
        def press(info):
            if info.epoch == 1 and info.step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # first: stop after this step...
                os.kill(os.getpid(), signal.SIGINT)  # ...second: abort now

        return real_run(job, on_step=press, on_epoch=on_epoch)

    monkeypatch.setattr(api, "run", run_and_press_ctrl_c_twice)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["train", "test_resnet", "--data", tiny_fashion, "--epochs", "2", "--batch-size", "64", "--out", str(out)]
    )
    assert result.exit_code == 130, result.output
    assert f"the last checkpoint (written at the end of an epoch) is kept in {out}" in result.output
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0) and not (out / "model.safetensors").exists()
    assert math.isfinite(checkpoint["history"][0]["train_loss"])
