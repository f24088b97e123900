"""The network a run started from, found again from what its export records.

``manidp eval EXPORT --escalate-to-start`` escalates the images a pruned export is unsure of to the
dense network it was pruned from. A run records where that network came from: timm's pretrained
weights, or a weights file, which it also fingerprints (``StartFile``) so that a file replaced
since is refused rather than silently used as the start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from manidp_cli.errors import WeightsError
from manidp_cli.inputs import capped, is_file
from manidp_cli.models.factory import create_model, weights_file

HUB_START = "timm hub"  # a run's weights_source when it started from timm's pretrained weights
RANDOM_START = "random init"  # a dense run's without --weights
START_FILE = "start_file"  # the key of StartFile.to_dict() in an export's metadata and a checkpoint

_ELSE = "give --escalate-to a dense export of the start instead"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StartFile:
    """The weights file a run started from, as it was when the run began."""

    path: str  # absolute: the export may be evaluated from another folder
    sha256: str

    @classmethod
    def of(cls, weights: Path) -> StartFile:
        file = weights_file(Path(weights).expanduser()).resolve()
        return cls(str(file), file_sha256(file))

    @classmethod
    def from_dict(cls, value: Any) -> StartFile | None:
        """A recorded start file; None for a run that recorded none (timm's weights, or older exports)."""
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(value.get(key), str) for key in ("path", "sha256")):
            raise WeightsError(f"a recorded start file must hold 'path' and 'sha256' strings, got {capped(value)}")
        return cls(value["path"], value["sha256"])

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def build_start(
    model_name: str, num_classes: int, in_chans: int, weights_source: str, start_file: StartFile | None
) -> nn.Module:
    """The start an export records, in eval mode: its weights file (unchanged since, by its digest),
    or timm's pretrained weights when they answered the export's classes."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    if start_file is not None:
        file = Path(start_file.path)
        if not is_file(file, "the start's weights"):
            raise WeightsError(f"the start this export was pruned from, {capped(file)}, is gone: {_ELSE}")
        if file_sha256(file) != start_file.sha256:
            raise WeightsError(
                f"{capped(file)} has changed since this export was pruned from it (its sha256 is no longer "
                f"{start_file.sha256[:12]}...): {_ELSE}"
            )
        return create_model(model_name, **kwargs, weights=file).eval()
    if weights_source == HUB_START:
        trained_for = (create_model(model_name, **kwargs).pretrained_cfg or {}).get("num_classes")
        if trained_for != num_classes:
            raise WeightsError(
                f"this export was pruned from timm's pretrained {capped(model_name)}, whose {trained_for}-class "
                f"classifier was replaced by a new {num_classes}-class one: that start never answered these "
                f"classes; {_ELSE}"
            )
        return create_model(model_name, **kwargs, pretrained=True).eval()
    if weights_source == RANDOM_START:
        raise WeightsError(f"this export started from random weights: there is no start to escalate to; {_ELSE}")
    # an export written before runs recorded their start file: the path as given, not verified
    path = Path(weights_source).expanduser()
    if not path.exists():
        raise WeightsError(
            f"the start recorded for this export, {capped(weights_source)!r}, is not found from here (a relative "
            f"path is relative to where it was pruned): {_ELSE}"
        )
    return create_model(model_name, **kwargs, weights=path).eval()
