"""The CLI: commands through Typer's CliRunner, the error path of ``main()`` in a subprocess."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import run_main, write_image_folder
from typer.testing import CliRunner

from manidp_cli.api.jobs import MIN_GATED_SHARE, prepare
from manidp_cli.cli import app
from manidp_cli.core.gating import has_gates
from manidp_cli.errors import DataError, ManidpError, ModelError, RecipeError, TargetError, WeightsError
from manidp_cli.io import MODEL_FILE, load_pruned

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and "manidp 0.1.0" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == "manidp 0.1.0\n"
    result = runner.invoke(app, ["version", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"version": "0.1.0"}
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "--target-flops" in result.output


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["prune", "resnet343", "--target-flops", "0.5"], ModelError, "did you mean"),
        (["prune", "resnet18", "--target-flops", "1.5"], TargetError, "between 0 and 1"),
        (["prune", "resnet18", "--target-flops", "0.5", "--data", "cifar10:/no/dir"], DataError, "does not exist"),
        (["prune", "resnet34", "--target-flops", "0.45"], DataError, "give the data to fine-tune on with --data"),
        (
            ["prune", "resnet18", "--target-flops", "0.5", "--data", "embedded"],
            WeightsError,
            "pass a local file with --weights",
        ),
        (["train", "resnet18", "--weights", "/no/file.safetensors"], WeightsError, "not found"),
        (["prune", "resnet18", "--resume", "--out", "/no/run"], ManidpError, "nothing to resume"),
    ],
)
def test_bad_input_raises_the_library_error(args, error, message, tmp_path):
    result = runner.invoke(app, args + ([] if "--out" in args else ["--out", str(tmp_path / "out")]))
    assert isinstance(result.exception, error), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_target_the_gates_cannot_reach_is_refused_and_a_low_one_warned_of(tiny_fashion, dense_weights, tmp_path):
    out = tmp_path / "out"
    common = ["prune", "test_resnet", "--weights", str(dense_weights), "--data", tiny_fashion, "--out", str(out)]
    result = runner.invoke(app, [*common, "--target-flops", "0.01"])
    assert isinstance(result.exception, TargetError), result.output
    message = str(result.exception)
    assert "--target-flops 0.01 leaves the gates" in message and "recipes/hybrid.yaml" in message
    least = float(re.search(r"give --target-flops ([0-9.]+) or more", message).group(1))
    assert not out.exists()  # refused before anything is written
    overrides = {"data": tiny_fashion, "epochs": 1}
    job = prepare("prune", "test_resnet", overrides={**overrides, "target_flops": least}, weights=dense_weights)
    assert MIN_GATED_SHARE <= job.gated_share < MIN_GATED_SHARE + 0.01
    assert job.gate_floor < least
    with pytest.raises(TargetError, match="leaves the gates"):
        prepare("prune", "test_resnet", overrides={**overrides, "target_flops": least - 0.002}, weights=dense_weights)
    # accepted, with a warning in the plan: so little left to the gates measured worse than static pruning
    result = runner.invoke(app, [*common, "--target-flops", str(least), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "recipes/hybrid.yaml" in result.output
    result = runner.invoke(app, [*common[:-1], str(tmp_path / "wide"), "--target-flops", "0.6", "--epochs", "1"])
    assert result.exit_code == 0 and "warning" not in result.output


def test_malformed_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimiser:\n  lr: 0.1\n")
    result = runner.invoke(app, ["train", "resnet18", "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, RecipeError)
    assert "unknown key 'optimiser'" in str(result.exception)


def test_main_turns_errors_into_one_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "manidp_cli", "prune", "resnet343", "--target-flops", "0.5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'resnet343'; did you mean resnet34")
    assert "Traceback" not in proc.stderr


def test_train_then_prune_end_to_end(tiny_fashion, tmp_path):
    dense = tmp_path / "dense"
    result = runner.invoke(
        app,
        ["train", "test_resnet", "--data", tiny_fashion, "--epochs", "1", "-b", "32", "--out", str(dense), "--json"],
    )
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)  # --json: nothing but the JSON on stdout, the progress on stderr
    assert trained["out_dir"] == str(dense) and len(trained["history"]) == 1 and "dense cost" in result.stderr
    assert (dense / "model.safetensors").is_file() and str(dense / "model.safetensors") in trained["files"]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("schedule:\n  calibration_images: 64\n  search_steps: 10\n")
    pruned = tmp_path / "pruned"
    result = runner.invoke(
        app,
        [
            "prune",
            "test_resnet",
            "--target-flops",
            "0.6",
            "--data",
            tiny_fashion,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--weights",
            str(dense / "model.safetensors"),
            "--recipe",
            str(recipe),
            "-o",
            "loss.lambda_sim=0.02",
            "--out",
            str(pruned),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lambda_sim: 0.02" in (pruned / "recipe.yaml").read_text()
    for text in ("dense cost", "gated convolutions", "target", "before", "after"):
        assert text in result.output
    # test_resnet's widest gate (C_out 192, hidden 24) would cost over 0.03 of what it decides at 32 px
    assert "(1 with a hidden layer narrowed by gates.max_cost)" in " ".join(result.output.split())
    assert re.search(r"the gates route [\d.]+% of their channels", result.output), result.output
    assert f"manidp bench {pruned}" in " ".join(result.output.split())  # rich may wrap the line
    assert "narrow (only the channels a batch keeps)" in " ".join(result.output.split())
    assert (pruned / "report.json").is_file()
    # not a terminal (as under nohup or SLURM): plain progress lines instead of a silent bar
    lines = re.findall(
        r"^epoch 1/1 step (\d+)/(\d+) .*flops_ratio [\d.]+ .*images/s, \d+:\d\d:\d\d left$", result.output, re.M
    )
    assert lines and lines[-1][0] == lines[-1][1], result.output


def test_eval_and_report_commands(pruned, tmp_path):
    result = runner.invoke(app, ["eval", str(pruned.out_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 64 and "signature" in data
    assert 0 <= data["flops"]["routed_channel_share"] <= 1
    result = runner.invoke(app, ["eval", str(pruned.out_dir), "--limit", "16"])
    assert result.exit_code == 0 and "Spearman(loss, FLOPs)" in result.output and "dynamic p90" in result.output
    assert "routed channels" in result.output
    result = runner.invoke(app, ["eval", str(pruned.out_dir), "--limit", "16", "--dynamic", "--json"])
    assert result.exit_code == 0, result.output
    fast = json.loads(result.stdout)["dynamic_execution"]
    assert fast["images"] == 16 and fast["codebook"] is False  # free masks: the executor gathers per image
    # every image decides as the masked model did, or diverges only at a tie within rounding (a CPU
    # with other kernels may break such a tie the other way: the outputs are then not compared)
    assert fast["images_diverging_unexplained"] == 0 and fast["decision_agreement"] >= 0.95
    assert fast["decisions"] == 16 * len(load_pruned(pruned.out_dir)[1].metadata["gated_layers"])
    diverging = fast["images_diverging_at_near_ties"]
    assert fast["images_with_every_decision_equal"] == (16 - diverging) / 16
    result = runner.invoke(app, ["eval", str(pruned.out_dir), "--limit", "2", "--dynamic"])
    assert result.exit_code == 0 and "(image, layer) decisions equal" in result.output
    result = runner.invoke(app, ["report", str(pruned.out_dir), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0 and "total" in result.output and "fvcore" in result.output
    assert len(list((tmp_path / "p").glob("*.png"))) == 4
    result = runner.invoke(app, ["report", str(pruned.out_dir), "--json", "--plots", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] and "wrote" in result.stderr  # pipes into jq
    result = runner.invoke(app, ["report", str(pruned.out_dir), "--img-size", "48", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output  # --img-size re-measures, on the export's data
    report = json.loads(result.stdout)
    assert report["input_shape"] == [1, 48, 48] and report["measured_on"].startswith("measured now on 64")
    assert re.search(r"^evaluating 1/1 batches, .* left$", result.stderr, re.M), result.stderr
    for fmt in ("json", "csv", "markdown"):
        out = tmp_path / f"report.{fmt}"
        result = runner.invoke(app, ["report", str(pruned.out_dir), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0 and out.stat().st_size > 100
    result = runner.invoke(app, ["report", "resnet18", "--input-size", "3,64,64"])
    assert result.exit_code == 0 and "would be gated" in result.output
    result = runner.invoke(app, ["report", "resnet18", "--input-size", "64"])
    assert isinstance(result.exception, ManidpError) and "C,H,W" in str(result.exception)


def test_export_static_and_bench_commands(pruned, tmp_path):
    out = tmp_path / "static"
    result = runner.invoke(
        app, ["export-static", str(pruned.out_dir), "--out", str(out), "--calibration-images", "64", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert all((out / name).is_file() for name in ("model.pt2", "model.safetensors", "config.json", "manidp.json"))
    assert re.search(r"^calibrating 1/1 batches, .* left$", result.stderr, re.M), result.stderr
    assert re.search(r"^evaluating 1/1 batches, .* left$", result.stderr, re.M), result.stderr
    assert 0 < data["flops_ratio_to_original"] <= 1 and 0 <= data["accuracy"]["top1"] <= 1
    import torch

    program = torch.export.load(str(out / "model.pt2")).module()
    assert program(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    result = runner.invoke(
        app,
        [
            "bench",
            str(pruned.out_dir),
            "--runs",
            "3",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--static",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert {"dense", "masked", "dynamic", "static"} <= set(bench["variants"]) and bench["device"] == "cpu"
    assert re.search(r"^timing batch 1 4/4 rounds, .* left$", result.stderr, re.M), result.stderr
    assert re.search(r"^timing batch 4 (\d+)/\1 variants, .* left$", result.stderr, re.M), result.stderr
    result = runner.invoke(app, ["bench", str(pruned.out_dir), "--static", str(out), "--img-size", "48"])
    assert isinstance(result.exception, ManidpError) and "takes (1, 32, 32) images, not (1, 48, 48)" in str(
        result.exception
    )
    result = runner.invoke(
        app, ["export-static", str(pruned.out_dir), "--out", str(tmp_path / "x"), "--min-keep-rate", "1.5"]
    )
    assert isinstance(result.exception, ManidpError) and "[0, 1)" in str(result.exception)


def test_bench_times_the_torch_pruning_baseline_and_recommends_a_variant(pruned):
    args = ["bench", str(pruned.out_dir), "--runs", "3", "--warmup", "1", "--batch-size", "4"]
    result = runner.invoke(app, [*args, "--baseline", "static-l1", "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert {"torch_pruning", "torch_pruning_channels_last", "dynamic"} <= set(bench["variants"])
    fastest = min(bench["variants"], key=lambda name: bench["variants"][name]["latency_ms_median"])
    assert bench["recommendation"].endswith(f"{bench['variants'][fastest]['layout']})")
    assert bench["cpu"]["model"] and bench["cpu"]["torch_capability"]
    assert bench["inputs"].startswith("32 evaluation images of ")  # a trained network's decisions need real images
    assert {"static", "static_channels_last"} <= set(bench["variants"])  # the in-memory static export
    result = runner.invoke(app, [*args, "--no-static-export", "--json"])
    assert result.exit_code == 0, result.output
    assert not {"static", "static_channels_last"} & set(json.loads(result.stdout)["variants"])
    result = runner.invoke(app, [*args, "--static-keep-rate", "1.5"])
    assert isinstance(result.exception, ManidpError) and "--static-keep-rate must be in [0, 1), got 1.5" in str(
        result.exception
    )
    result = runner.invoke(app, [*args, "--baseline", "static-l2"])
    assert isinstance(result.exception, ManidpError) and "one of static-l1, got 'static-l2'" in str(result.exception)


def test_bench_builds_the_static_export_and_says_how_often_it_agrees(pruned):
    from manidp_cli.api.bench import static_export_in_memory

    gated, info = load_pruned(pruned.out_dir)
    data, _ = info.load_data(None)
    images = next(iter(data.eval.batches(1000)))[0]  # every evaluation image the export has (64)
    network, advice = static_export_in_memory(gated, data, tuple(info.input_shape), 0.5)
    assert not has_gates(network) and network(images).shape == (len(images), 10)
    agreement = re.search(rf"agrees with the gated model's on ([\d.]+)% of {len(images)} test images", advice)
    assert agreement, advice
    with torch.no_grad():
        expected = (gated(images).argmax(1) == network(images).argmax(1)).double().mean()
    assert float(agreement.group(1)) == pytest.approx(100 * float(expected), abs=0.05)


def test_image_folder_with_img_size_workers_and_progress(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    out = tmp_path / "dense"
    args = ["--data", str(folder), "--img-size", "32", "-j", "0", "--epochs", "1", "-b", "4", "--out", str(out)]
    result = runner.invoke(app, ["train", "test_resnet", *args, "--json"])
    assert result.exit_code == 0, result.output
    metadata = load_pruned(out)[1].metadata  # test_resnet's pretrained_cfg says 160 px; --img-size wins
    assert metadata["input_shape"] == [3, 32, 32] and metadata["recipe"]["img_size"] == 32
    # the export is evaluated at its own size; progress goes to stderr, stdout holds the JSON alone
    result = runner.invoke(app, ["eval", str(out), "--json", "-j", "0", "-b", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    serial = json.loads(result.stdout)
    assert serial["input_shape"] == [3, 32, 32] and serial["images"] == 6
    done = re.findall(r"^evaluating (\d)/3 batches, [\d.e+]+ batches/s, \d+:\d\d:\d\d left$", result.stderr, re.M)
    assert done == ["1", "2", "3"], result.stderr
    result = runner.invoke(app, ["eval", str(out), "--json", "-j", "2", "-b", "2"])
    assert result.exit_code == 0 and json.loads(result.stdout) == serial  # same images, same order
    result = runner.invoke(app, ["eval", str(out), "--json", "-j", "0", "--img-size", "48"])
    assert result.exit_code == 0 and json.loads(result.stdout)["input_shape"] == [3, 48, 48]


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "{dir}", "--device", "gpu"], "error: --device must be auto, cpu or cuda, got 'gpu'"),
        (["report", "{dir}", "--device", "tpu"], "error: --device must be auto, cpu or cuda, got 'tpu'"),
        (["export-static", "{dir}", "--out", "{dir}/s", "--device", "gpu"], "error: --device must be auto, cpu or"),
        (["bench", "{dir}", "--device", "gpu"], "error: --device must be auto, cpu or cuda, got 'gpu'"),
        (["train", "test_resnet", "--device", "gpu"], "'device': Input should be 'auto', 'cpu' or 'cuda' (got 'gpu')"),
        (["eval", "{dir}", "--img-size", "0"], "'--img-size': Input should be greater than or equal to 8"),
        (["bench", "{dir}", "--img-size", "abc"], "Invalid value for '--img-size'"),
        (["prune", "test_resnet", "--img-size", "5000"], "Invalid value for '--img-size'"),
        (["train", "test_resnet", "-o", "img_size=4"], "'img_size': Input should be greater than or equal to 8"),
        (["eval", "{dir}", "-j", "-1"], "Invalid value for '--workers' / '-j'"),
        (["report", "{dir}", "--workers", "two"], "Invalid value for '--workers' / '-j'"),
        (["train", "test_resnet", "-o", "workers=-2"], "'workers': Input should be greater than or equal to 0"),
    ],
)
def test_bad_device_img_size_and_workers_are_one_line_errors(monkeypatch, capsys, tmp_path, args, message):
    code, lines = run_main(monkeypatch, capsys, *(a.replace("{dir}", str(tmp_path)) for a in args))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["eval", "report", "bench", "train"])
def test_cuda_without_a_cuda_device_is_one_line(monkeypatch, capsys, tmp_path, command):
    target = "test_resnet" if command == "train" else str(tmp_path)
    extra = ["--out", str(tmp_path / "out")] if command == "train" else []
    code, lines = run_main(monkeypatch, capsys, command, target, "--device", "cuda", *extra)
    assert code == 2 and lines == ["error: --device cuda asked for, but torch sees no CUDA device"]


def test_every_command_json_pipes_into_json_tool(pruned, tiny_fashion, tmp_path):
    """`manidp COMMAND --json | python -m json.tool` for every command: nothing but the JSON on stdout
    (progress, plans and notices go to stderr). A command added without a case here fails the test."""
    dense, static = tmp_path / "dense", tmp_path / "static"
    tiny = ["--data", tiny_fashion, "--epochs", "1", "-b", "32", "-o", "train_images=64"]
    commands = {
        "version": ["version"],
        "train": ["train", "test_resnet", *tiny, "--out", str(dense)],
        "prune": ["prune", "test_resnet", "--target-flops", "0.6", *tiny, "--weights", str(dense / MODEL_FILE)],
        "eval": ["eval", str(pruned.out_dir), "--limit", "16"],
        "report": ["report", str(pruned.out_dir)],
        "export-static": ["export-static", str(pruned.out_dir), "--out", str(static), "--calibration-images", "32"],
        "bench": ["bench", str(pruned.out_dir), "--runs", "3", "--warmup", "1", "--batch-size", "2"],
    }
    commands["prune"] += ["--out", str(tmp_path / "pruned")]
    registered = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert registered == set(commands), registered ^ set(commands)
    for name, args in commands.items():
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, (name, result.output)
        piped = subprocess.run([sys.executable, "-m", "json.tool"], input=result.stdout, capture_output=True, text=True)
        assert piped.returncode == 0 and result.stdout.strip(), (name, result.stdout[:300], piped.stderr)
