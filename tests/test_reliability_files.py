"""What manidp writes and reads on disk, under attack and under failure (docs/reliability.md, items
1, 2, 3, 4 and 6): crafted static exports, outputs that would destroy an export, planted symbolic
links, two runs on one folder, and a full disk."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import CLI_ENV, run_manidp

from manidp_cli.api import export_static
from manidp_cli.api.jobs import prepare, run
from manidp_cli.cli import app
from manidp_cli.errors import ManidpError, OutputError, WeightsError
from manidp_cli.files import atomic_write, atomic_write_text, run_folder_lock, staged_folder
from manidp_cli.runtime.slimming import load_static, verify_static_program


def train_tiny(out, data, **overrides):
    job = prepare(
        "train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": data, **overrides}, out_dir=out
    )
    return run(job)


def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def static_export(pruned, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static"
    export_static(pruned.out_dir, out, min_keep_rate=0.3, calibration_images=64)
    return out


class RunsShell:
    """Unpickling this runs ``touch MARKER``: the payload of the crafted archives below."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_member(archive: Path, suffix: str, content: bytes) -> None:
    """Replace the member of ``archive`` whose name ends with ``suffix``."""
    with zipfile.ZipFile(archive) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(archive, "w") as target:
        for info, data in members:
            target.writestr(info, content if info.filename.endswith(suffix) else data)


# 1. a crafted model.pt2 must never run


def test_bench_static_refuses_a_pickle_that_runs_code(pruned, static_export, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(static_export, crafted)
    marker = tmp_path / "payload-ran"
    rewrite_member(crafted / "model.pt2", "data/sample_inputs/model.pt", pickle.dumps(RunsShell(marker), protocol=2))
    proc = run_manidp(["bench", pruned.out_dir, "--runs", "3", "--warmup", "0", "--static", crafted], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing" in lines[0] and "sample_inputs" in lines[0], proc.stderr
    assert not marker.exists()
    # the archive is a real threat: torch.export.load falls back to weights_only=False and runs it
    with pytest.raises(Exception):
        torch.export.load(str(crafted / "model.pt2"))
    assert marker.exists()


@pytest.mark.parametrize(
    "member, edit, message",
    [
        (
            "models/model.json",
            lambda j: j["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system"),
            "not an aten operator",
        ),
        (
            "data/weights/model_weights_config.json",
            lambda j: next(iter(j["config"].values())).update(use_pickle=True),
            "unpickle",
        ),
        ("models/model.json", lambda j: j.update(guards_code=["__import__('os').system('true')"]), "guard code"),
        (
            "models/model.json",
            lambda j: j["range_constraints"].update({"exec(chr(49))": {"min_val": 1, "max_val": 2}}),
            "size expression",
        ),
    ],
)
def test_static_program_with_python_calls_or_pickled_weights_is_refused(static_export, tmp_path, member, edit, message):
    crafted = tmp_path / "model.pt2"
    shutil.copy(static_export / "model.pt2", crafted)
    with zipfile.ZipFile(crafted) as archive:
        content = json.loads(next(archive.read(n) for n in archive.namelist() if n.endswith(member)))
    edit(content)
    rewrite_member(crafted, member, json.dumps(content).encode())
    with pytest.raises(WeightsError, match=message):
        verify_static_program(crafted)
    verify_static_program(static_export / "model.pt2")  # the genuine one passes


def test_extra_members_are_refused(static_export, tmp_path):
    crafted = tmp_path / "model.pt2"
    shutil.copy(static_export / "model.pt2", crafted)
    with zipfile.ZipFile(crafted, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/aotinductor/model/lib.so", b"\x7fELF")
    with pytest.raises(WeightsError, match="aotinductor"):
        verify_static_program(crafted)


def test_static_network_is_rebuilt_from_weights_alone(static_export):
    metadata = json.loads((static_export / "manidp.json").read_text())
    assert sum(metadata["channels_removed"].values()) > 0  # narrowed layers are exercised
    rebuilt, _ = load_static(static_export)
    program = torch.export.load(str(static_export / "model.pt2")).module()  # our own, trusted file
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), program(images), rtol=1e-5, atol=1e-5)


# 2. outputs that would destroy an export


@pytest.fixture
def ref(pruned, tmp_path):
    """A copy of the pruned export (the session's own must stay intact)."""
    folder = tmp_path / "ref"
    shutil.copytree(pruned.out_dir, folder)
    return folder


def test_export_static_refuses_an_out_that_holds_an_export(ref, tmp_path):
    from typer.testing import CliRunner

    before = (ref / "model.safetensors").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(b"a run")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [
        (ref, "is the export being read"),
        (ref / "model.safetensors", "is a file"),
        (other, "already holds a manidp run"),
        (afile, "is a file"),
    ]:
        result = CliRunner().invoke(app, ["export-static", str(ref), "--out", str(out), "--calibration-images", "8"])
        assert isinstance(result.exception, ManidpError) and message in str(result.exception), (out, result.output)
    assert (ref / "model.safetensors").read_bytes() == before and (other / "checkpoint.pt").read_bytes() == b"a run"
    assert temporaries(tmp_path) == [] and temporaries(ref) == []
    # the output is checked before the export is read
    result = CliRunner().invoke(app, ["export-static", str(tmp_path / "no-export"), "--out", str(afile)])
    assert isinstance(result.exception, ManidpError) and "--out" in str(result.exception)


def test_report_out_never_overwrites_an_export(ref, tmp_path):
    from typer.testing import CliRunner

    files = {name: (ref / name).read_bytes() for name in ("model.safetensors", "report.json")}
    for out, message in [
        (ref / "model.safetensors", "weights file"),
        (ref / "report.json", "file of the manidp run"),
        (ref, "is a folder"),
        (tmp_path / "missing" / "r.json", "does not exist"),
    ]:
        result = CliRunner().invoke(app, ["report", str(ref), "--format", "json", "--out", str(out)])
        assert isinstance(result.exception, OutputError) and message in str(result.exception), (out, result.output)
    assert {name: (ref / name).read_bytes() for name in files} == files
    result = CliRunner().invoke(app, ["report", str(ref), "--format", "json", "--out", str(ref / "flops.json")])
    assert result.exit_code == 0 and json.loads((ref / "flops.json").read_text())
    assert temporaries(ref) == []


def test_failed_static_export_leaves_nothing(tmp_path):
    out = tmp_path / "static"

    def write_then_fill_the_disk(stage):
        (stage / "model.pt2").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no space left on device.*was not created"):
        with staged_folder(out) as stage:
            write_then_fill_the_disk(stage)
    assert list(tmp_path.iterdir()) == []


# 3. planted symbolic links and stale temporaries


def test_train_never_writes_through_planted_links(tiny_fashion, tmp_path):
    out, victim = tmp_path / "o", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious")
    for name in ("recipe.yaml.tmp", "checkpoint.pt.tmp", "metrics.jsonl", ".model.safetensors.0123456789ab.tmp"):
        (out / name).symlink_to(victim)
    (out / ".checkpoint.pt.ba9876543210.tmp").write_bytes(b"left by a killed run")
    result = train_tiny(out, tiny_fashion)
    assert not result.interrupted and (out / "model.safetensors").is_file()
    assert victim.read_text() == "precious"
    assert not (out / "metrics.jsonl").is_symlink() and (out / "metrics.jsonl").read_text().startswith("{")
    assert temporaries(out) == []  # stale temporaries and links at their names are gone


def test_atomic_write_replaces_a_link_not_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out.json").symlink_to(victim)
    atomic_write_text(tmp_path / "out.json", "{}")
    assert victim.read_text() == "precious" and not (tmp_path / "out.json").is_symlink()


# 4. two runs on one folder


def test_second_run_on_a_locked_folder_fails_at_once(tiny_fashion, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from manidp_cli.files import run_folder_lock\n"
            f"with run_folder_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        job = prepare(
            "train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": tiny_fashion}, out_dir=out
        )
        with pytest.raises(OutputError, match=f"is in use by another manidp run \\(pid {holder.pid}\\)"):
            run(job)
        assert sorted(p.name for p in out.iterdir()) == [".manidp.lock"]  # nothing of the run written
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing stale is left
        holder.wait()
    with run_folder_lock(out):
        pass


def test_run_rechecks_the_folder_under_its_lock(tiny_fashion, tmp_path):
    """Two runs prepared together: the one that locks second finds the other's finished run."""
    out = tmp_path / "o"
    first = prepare(
        "train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": tiny_fashion}, out_dir=out
    )
    second = prepare(
        "train", "test_resnet", overrides={"epochs": 1, "batch_size": 32, "data": tiny_fashion, "seed": 1}, out_dir=out
    )
    run(first)
    exported = (out / "model.safetensors").read_bytes()
    with pytest.raises(ManidpError, match="already holds a run"):
        run(second)
    assert (out / "model.safetensors").read_bytes() == exported
    assert "seed: 0" in (out / "recipe.yaml").read_text()


def test_lock_released_after_each_run(tmp_path):
    with run_folder_lock(tmp_path):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with run_folder_lock(tmp_path):
                pass
    with run_folder_lock(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


# 6. a full disk


def test_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"last good checkpoint")

    def fill_the_disk(handle):
        handle.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=f"cannot write {target}: no space left on device; {target} was not replaced"):
        atomic_write(target, fill_the_disk)
    assert target.read_bytes() == b"last good checkpoint" and temporaries(tmp_path) == []


def test_checkpoint_that_does_not_fit_is_one_line_and_the_rerun_works(tiny_fashion, tmp_path):
    limit = 2_000_000  # the 1.5 MB export fits, the 3 MB checkpoint does not
    proc = run_manidp(
        ["train", "test_resnet", "--data", tiny_fashion, "--epochs", "1", "--batch-size", "32", "--out", "o"],
        cwd=tmp_path,
        preamble=f"import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))",
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write o/checkpoint.pt" in lines[0] and "was not replaced" in lines[0], (
        proc.stderr
    )
    assert list(tmp_path.rglob("*.tmp")) == [] and not (tmp_path / "o" / "checkpoint.pt").exists()
    proc = run_manidp(
        ["train", "test_resnet", "--data", tiny_fashion, "--epochs", "1", "--batch-size", "32", "--out", "o"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_full_disk_mid_run_keeps_the_last_checkpoint_for_resume(tiny_fashion, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real_save, saves = torch.save, []

    def second_checkpoint_fills_the_disk(obj, handle, *args, **kwargs):
        saves.append(obj.get("epoch"))
        if len(saves) == 2:
            handle.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_checkpoint_fills_the_disk)
    with pytest.raises(OutputError, match="no space left on device.*continue with --resume"):
        train_tiny(out, tiny_fashion, epochs=2)
    monkeypatch.undo()
    assert temporaries(out) == [] and torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    job = prepare("train", None, out_dir=out, resume=True)
    assert not run(job).interrupted and (out / "model.safetensors").is_file()


def test_export_that_does_not_fit_is_one_line_and_resume_writes_it(tiny_fashion, tmp_path):
    """The disk fills up between the last checkpoint and the export: the trained model is in the
    checkpoint, and --resume writes the export without training again."""
    fill_at_export = (
        "import resource, signal\nimport manidp_cli.api.jobs as pipeline\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "real_save = pipeline.save_model\n"
        "def save_model(*args, **kwargs):\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "    return real_save(*args, **kwargs)\n"
        "pipeline.save_model = save_model"
    )
    args = ["train", "test_resnet", "--data", tiny_fashion, "--epochs", "1", "--batch-size", "32", "--out", "o"]
    proc = run_manidp(args, cwd=tmp_path, preamble=fill_at_export)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write o/model.safetensors" in lines[0] and "--resume --out o" in lines[0], (
        proc.stderr
    )
    assert temporaries(tmp_path / "o") == [] and not (tmp_path / "o" / "model.safetensors").exists()
    proc = run_manidp(["train", "--resume", "--out", "o"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()
