"""Exceptions for bad input. The CLI turns each into a one-line message and exit code 2."""


class ManidpError(Exception):
    """Base class: something the user gave (model, weights, data, recipe, target) is not usable."""


class ModelError(ManidpError):
    """Unknown model name, or a model whose layout manidp cannot gate."""


class WeightsError(ManidpError):
    """Weights that cannot be read, or that do not fit the model."""


class RecipeError(ManidpError):
    """A recipe file that is missing, malformed or has unknown keys."""


class DataError(ManidpError):
    """A data specification that names nothing readable."""


class TargetError(ManidpError):
    """An out-of-range numeric target, e.g. --target-flops outside (0, 1)."""


class OutputError(ManidpError):
    """An output path that cannot be written safely (in use, not empty, a run's own file, disk full)."""


class TrainingError(ManidpError):
    """A run that cannot go on: its loss or weights became NaN or infinite (learning rate too high,
    broken starting weights). Nothing from the failing step is saved."""


class ExportError(ManidpError):
    """An artifact that cannot be made, or not faithfully: a missing optional package (named with
    the extra that installs it), or an ONNX file whose outputs disagree with PyTorch's."""
