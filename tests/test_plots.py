import struct

from manidp_cli.analysis.plots import write_plots
from manidp_cli.analysis.report import flops_report


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plots_are_written_with_the_right_size(pruned, tmp_path):
    paths = write_plots(flops_report(pruned.out_dir), tmp_path / "plots")
    assert [p.name for p in paths] == [
        "keep_ratio.png",
        "flops_histogram.png",
        "loss_vs_flops.png",
        "channel_keep_heatmap.png",
    ]
    for path in paths:
        assert path.stat().st_size > 5000
        assert _png_size(path) == (1000, 450)
