"""Per-layer codebooks of keep-sets: dynamic pruning that dynamic execution can run without gathers.

A free ManiDP mask lets every image keep any subset of a layer's channels, so a fast executor must
slice weights per image. A codebook limits each gated layer to K fixed channel sets (entries); an
image still chooses its entry from its own saliencies (``SaliencyGate.entry``: the largest summed
excess saliency over the threshold), so hard and easy images still get different sub-networks, but
every entry's weights can be sliced and packed once.

Entries are learned from calibration images with the objective the free mask maximises: image i's
score for keep-set c is sum_j c_j * (pi_ij - tau). Starting from K groups of images ordered by how
many channels they keep, the build alternates assigning every image to its best entry and setting
each entry to the channels whose summed excess over its images is positive (both steps can only
raise the total score). Entry widths are then rounded to a multiple of ``channel_multiple`` (vector
kernels run whole blocks of channels) by adding or dropping the channels of least summed excess;
``width_scale`` scales every learned width before rounding, which is how
``calibration.fit_codebook_widths`` brings the snapped model's FLOPs back to the target that the
rounding moved.

Example::

    build_codebooks(model, calibration_batches, CodebookConfig(entries=4))
    gates_of(model)["layer1_0_conv1"].codebook   # 4 x 64 rows of 0/1
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from manidp_cli.config import CodebookConfig
from manidp_cli.core.distributed import World
from manidp_cli.core.gating import gates_of
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.errors import ManidpError


def _round_width(width: float, channels: int, multiple: int) -> int:
    if channels <= multiple:
        return channels
    rounded = max(multiple, int(round(width / multiple)) * multiple)
    return min(rounded, channels)


@dataclass(frozen=True)
class LearnedCodebook:
    """One layer's keep-sets as learned, before their widths are rounded: K x C rows of 0/1 and
    each channel's excess saliency summed over the images of each entry."""

    entries: torch.Tensor
    summed_excess: torch.Tensor

    def rounded(self, channel_multiple: int, width_scale: float = 1.0, shift: int = 0) -> torch.Tensor:
        """The installable codebook: each entry's width times ``width_scale``, rounded to
        ``channel_multiple`` and moved by ``shift`` multiples (within 1 multiple and every channel),
        filled by rank (the entry's members first, each side by summed excess), duplicates merged."""
        codebook = torch.zeros_like(self.entries)
        channels = codebook.shape[1]
        for k in range(codebook.shape[0]):
            sums = self.summed_excess[k]
            width = _round_width(float(self.entries[k].sum()) * width_scale, channels, channel_multiple)
            if shift:
                width = min(channels, max(min(channel_multiple, channels), width + shift * channel_multiple))
            order = torch.argsort(sums + self.entries[k] * (sums.abs().max() * 2 + 1), descending=True)
            codebook[k, order[:width]] = 1
        return torch.unique(codebook, dim=0).float()


def _initial_groups(kept_counts: torch.Tensor, entries: int, world: World) -> torch.Tensor:
    """Group index per image: K groups of (globally) equal size by the number of channels kept."""
    everything = torch.cat([torch.as_tensor(c) for c in world.all_gather_object(kept_counts.cpu())])
    ordered = everything.sort().values.double()
    bounds = torch.quantile(ordered, torch.linspace(0, 1, entries + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(kept_counts.cpu().double(), bounds, right=True)


def build_codebook(
    excess: torch.Tensor, entries: int, channel_multiple: int = 8, iterations: int = 20, world: World = World()
) -> torch.Tensor:
    """K' x C rows of 0/1 (K' <= ``entries`` distinct keep-sets) from N x C excess saliencies
    ``pi - tau`` of this process's calibration images (sums are all-reduced across processes)."""
    return learn_codebook(excess, entries, iterations, world).rounded(channel_multiple)


def learn_codebook(excess: torch.Tensor, entries: int, iterations: int = 20, world: World = World()) -> LearnedCodebook:
    """``build_codebook`` before rounding: the entries that images use, at their learned widths."""
    excess = excess.detach().double().cpu()
    channels = excess.shape[1]
    assignment = _initial_groups((excess >= 0).sum(1), entries, world)
    codebook = torch.zeros(entries, channels, dtype=torch.float64)
    for _ in range(iterations):
        one_hot = torch.nn.functional.one_hot(assignment, entries).double()
        sums = world.all_reduce_sum(one_hot.t() @ excess).double()  # K x C summed excess per group
        members = world.all_reduce_sum(one_hot.sum(0)).double()
        updated = (sums > 0).double()
        # a group that lost every image keeps its previous set (or its best channel at the start)
        for k in torch.nonzero(members == 0).flatten().tolist():
            updated[k] = codebook[k]
        codebook = updated
        new_assignment = (excess @ codebook.t()).argmax(1)
        changed = world.all_reduce_sum(torch.tensor([float((new_assignment != assignment).sum())]))
        assignment = new_assignment
        if float(changed[0]) == 0:
            break
    one_hot = torch.nn.functional.one_hot(assignment, entries).double()
    sums = world.all_reduce_sum(one_hot.t() @ excess).double()
    members = world.all_reduce_sum(one_hot.sum(0)).double()
    used = torch.nonzero(members > 0).flatten()
    return LearnedCodebook(codebook[used], sums[used])


@torch.no_grad()
def build_codebooks(model: nn.Module, batches, config: CodebookConfig, world: World = World()) -> dict[str, int]:
    """Learn and install a codebook in every gate of ``model`` from its saliencies on ``batches``
    under the current thresholds (eval mode); return the number of entries per layer."""
    return install_codebooks(model, learn_codebooks(model, batches, config, world), config.channel_multiple)


@torch.no_grad()
def learn_codebooks(
    model: nn.Module, batches, config: CodebookConfig, world: World = World()
) -> dict[str, LearnedCodebook]:
    """Every gate's keep-sets learned from its saliencies on ``batches`` under the current thresholds
    (eval mode, free masks), not installed yet."""
    gates = gates_of(model).by_name()
    unset = [name for name, gate in gates.items() if not torch.isfinite(gate.threshold)]
    if unset:
        raise ManidpError(
            f"cannot build codebooks before thresholds are set: {len(unset)} gates have none ({unset[0]}, ...)"
        )
    clear_codebooks(model)  # free masks while recording: entries must not shape their own data
    saliencies: dict[str, list[torch.Tensor]] = {name: [] for name in gates}
    with eval_mode(model), GateRecorder(model, detach=True) as recorder:
        for images in batches:
            model(images)
            for name, saliency in recorder.saliency.items():
                saliencies[name].append(saliency.float().cpu())
    return {
        name: learn_codebook(
            torch.cat(saliencies[name]) - float(gate.threshold), config.entries, config.iterations, world
        )
        for name, gate in gates.items()
    }


def install_codebooks(
    model: nn.Module,
    learned: dict[str, LearnedCodebook],
    channel_multiple: int,
    width_scale: float = 1.0,
    shifts: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Put each gate's learned codebook, rounded (``LearnedCodebook.rounded``, moved by its layer's
    ``shifts`` in channel multiples), in force; return the number of entries per layer."""
    sizes = {}
    for name, gate in gates_of(model).by_name().items():
        codebook = learned[name].rounded(channel_multiple, width_scale, (shifts or {}).get(name, 0))
        gate.codebook = codebook.to(gate.threshold.device)
        sizes[name] = codebook.shape[0]
    return sizes


def clear_codebooks(model: nn.Module) -> None:
    """Back to free per-channel masks."""
    for gate in gates_of(model).values():
        gate.codebook = gate.codebook.new_zeros(0, gate.out_channels)
