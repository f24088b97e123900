import csv
import io
import json

import pytest

from manidp_cli.analysis.report import flops_report, model_report
from manidp_cli.errors import ManidpError


def test_stored_report_of_an_export(pruned):
    report = flops_report(pruned.out_dir)
    assert "at export time" in report.measured_on and report.images == 64
    assert report.ratio == pytest.approx(pruned.after.flops.mean_ratio)
    gated = [r for r in report.rows if r.gated]
    assert gated and all(0 <= r.keep_ratio_out <= 1 and 0 <= r.keep_ratio_in <= 1 for r in gated)
    total = sum(r.dynamic_mflops for r in report.rows) + report.gate_mflops + report.other_mflops
    assert total == pytest.approx(report.dynamic_mflops)
    assert sum(r.share for r in report.rows) < 1
    assert len(report.per_image_ratio) == len(report.per_image_loss) == 64


def test_recomputed_report_matches_the_stored_one(pruned, tiny_fashion):
    stored = flops_report(pruned.out_dir)
    again = flops_report(pruned.out_dir / "model.safetensors", data=tiny_fashion)
    assert "measured now on 64" in again.measured_on
    assert again.dynamic_mflops == pytest.approx(stored.dynamic_mflops)
    limited = flops_report(pruned.out_dir, data=tiny_fashion, limit=8)
    assert limited.images == 8


def test_renderings(pruned):
    report = flops_report(pruned.out_dir)
    data = json.loads(report.render("json"))
    assert set(data) >= {"model", "rows", "dense_mflops", "dynamic_mflops", "ratio", "convention", "per_image_ratio"}
    rows = list(csv.DictReader(io.StringIO(report.render("csv"))))
    assert len(rows) == len(report.rows) and rows[0]["name"] == report.rows[0].name
    markdown = report.render("markdown")
    assert "| **total** |" in markdown and markdown.count("\n|") == len(report.rows) + 5
    with pytest.raises(ManidpError, match="unknown format 'xml'"):
        report.render("xml")


def test_model_report_lists_what_would_be_gated():
    report = model_report("resnet18", (3, 224, 224))
    assert report.dense_mflops == pytest.approx(1819.066, abs=0.01)  # resnet18's well-known 1.82 GMACs
    assert len(report.would_gate) == 16 and "conv1" not in report.would_gate
    assert report.ratio == pytest.approx(1.0) and all(r.keep_ratio_out == 1.0 for r in report.rows)
    assert {r.name for r in report.rows if r.gated} == set(report.would_gate)


def test_dense_export_has_no_pruning_report(dense_weights, tiny_fashion):
    with pytest.raises(ManidpError, match="is a dense export"):
        flops_report(dense_weights, data=tiny_fashion)
