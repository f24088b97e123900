"""kill -9 in the middle of training: the last checkpoint survives and --resume ends where an
uninterrupted run ends, bit for bit."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

EPOCHS = "3"  # the kill lands after epoch 1's checkpoint, with two epochs still to go


def _train(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "manidp_cli",
        "train",
        "test_resnet",
        "--data",
        data,
        "--epochs",
        EPOCHS,
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def test_kill_9_during_training_resumes_to_the_uninterrupted_weights(tiny_fashion, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train(tiny_fashion, straight), check=True, capture_output=True, env=env, timeout=600)

    process = subprocess.Popen(
        _train(tiny_fashion, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    assert not (killed / "model.safetensors").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "manidp_cli", "train", "--resume", "--out", str(killed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
