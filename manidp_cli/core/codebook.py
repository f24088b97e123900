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
kernels run whole blocks of channels) by adding or dropping the channels of least summed excess.

Example::

    build_codebooks(model, calibration_batches, CodebookConfig(entries=4))
    gates_of(model)["layer1_0_conv1"].codebook   # 4 x 64 rows of 0/1
"""

from __future__ import annotations

import torch
from torch import nn

from manidp_cli.config import CodebookConfig
from manidp_cli.core.distributed import World
from manidp_cli.core.gating import gates_of
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.errors import ManidpError


def _round_width(width: int, channels: int, multiple: int) -> int:
    if channels <= multiple:
        return channels
    rounded = max(multiple, int(round(width / multiple)) * multiple)
    return min(rounded, channels)


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
    codebook, sums = codebook[used], sums[used]
    for k in range(len(used)):
        width = _round_width(int(codebook[k].sum()), channels, channel_multiple)
        # rank channels: members first, each side by summed excess, then take the first `width`
        order = torch.argsort(sums[k] + codebook[k] * (sums[k].abs().max() * 2 + 1), descending=True)
        codebook[k] = 0
        codebook[k, order[:width]] = 1
    return torch.unique(codebook, dim=0).float()


@torch.no_grad()
def build_codebooks(model: nn.Module, batches, config: CodebookConfig, world: World = World()) -> dict[str, int]:
    """Learn and install a codebook in every gate of ``model`` from its saliencies on ``batches``
    under the current thresholds (eval mode); return the number of entries per layer."""
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
    sizes = {}
    for name, gate in gates.items():
        excess = torch.cat(saliencies[name]) - float(gate.threshold)
        codebook = build_codebook(excess, config.entries, config.channel_multiple, config.iterations, world)
        gate.codebook = codebook.to(gate.threshold.device)
        sizes[name] = codebook.shape[0]
    return sizes


def clear_codebooks(model: nn.Module) -> None:
    """Back to free per-channel masks."""
    for gate in gates_of(model).values():
        gate.codebook = gate.codebook.new_zeros(0, gate.out_channels)
