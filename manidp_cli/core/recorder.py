"""A context manager that collects, per forward pass, what the ManiDP loss and FLOPs need.

Example::

    with GateRecorder(model, features=True) as rec:
        logits = model(images)
    rec.saliency["layer1.0.conv1"]   # B x C_out, differentiable
    rec.active_outputs()             # {conv name: B x C_out bool}
"""

from __future__ import annotations

import torch
from torch import nn

from manidp_cli.core.gating import gates_of


class GateRecorder:
    """Owns hook handles; each forward pass overwrites what the previous one recorded.

    - ``saliency``: gate name (``SaliencyGate.name``) -> B x C saliency (with grad unless ``detach``).
    - ``features``: gate name -> B x C global-average-pooled normalised output *before* masking
      (method.md, similarity term; an input gate's: its convolution's input); only with ``features=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        features: bool = False,
        detach: bool = False,
    ):
        self.model = model
        self.gates = gates_of(model)
        self._gates_by_name = self.gates.by_name()
        self.record_features = features
        self.detach = detach
        self.saliency: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def __enter__(self) -> GateRecorder:
        for gate in self.gates.values():
            name = gate.name
            self._handles.append(gate.register_forward_hook(self._saliency_hook(name)))
            if self.record_features:
                site = self.model.get_submodule(gate.mask_site)
                # prepend: run before the gate's own hook, i.e. see the tensor before masking
                if gate.mask_site_kind == "input":
                    hook = site.register_forward_pre_hook(self._feature_pre_hook(name), prepend=True)
                else:
                    hook = site.register_forward_hook(self._feature_hook(name), prepend=True)
                self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _saliency_hook(self, name):
        def hook(module, args, output):
            self.saliency[name] = self._keep(output)

        return hook

    def _pool(self, name, tensor):
        pooled = tensor.mean(dim=(2, 3))
        narrow = self._gates_by_name[name].narrow_output
        if narrow is not None and narrow.narrows(pooled):  # narrow training: the others count as 0
            pooled = narrow.widen(pooled)
        self.features[name] = self._keep(pooled)

    def _feature_pre_hook(self, name):
        def hook(module, args):
            self._pool(name, args[0])

        return hook

    def _feature_hook(self, name):
        def hook(module, args, output):
            self._pool(name, output)

        return hook

    def masks(self) -> dict[str, torch.Tensor]:
        """Gate name -> B x C mask (saliency where kept, 0 elsewhere)."""
        gates = self.gates.by_name()
        return {name: gates[name].mask(s) for name, s in self.saliency.items()}

    def active_outputs(self) -> dict[str, torch.Tensor]:
        """Gate name -> B x C bool, True where the channel is computed (an input gate's: read)."""
        gates = self.gates.by_name()
        return {name: gates[name].keep(s.detach()) for name, s in self.saliency.items()}
