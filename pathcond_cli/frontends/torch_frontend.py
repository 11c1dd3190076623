"""The PyTorch front end: ``nn.Module`` / ``ExportedProgram`` -> IR, and the torch file formats.

Formats (told apart by content, never by extension), one class each in :mod:`.torch_formats`:

* ``torch-state-dict``: a ``torch.save``'d state_dict, or a training checkpoint dict that holds one; the
  module is rebuilt with ``--arch package.module:factory``. Loaded with ``weights_only=True``.
* ``torch-export``: a ``torch.export.save`` archive (``.pt2``).
* ``torchscript``: a ``torch.jit.save`` archive (converted to an ExportedProgram for the graph).
* ``torch-module``: a pickled ``nn.Module`` (``torch.save(model)``): loading it runs code from the file,
  so it is refused unless ``--trust-pickle`` is given.
* ``safetensors``: a state_dict in a ``.safetensors`` file, or a sharded checkpoint given by its index
  (``model.safetensors.index.json``); the module is rebuilt with ``--arch`` as for a state_dict.

Every graph goes through ``torch.export`` and :mod:`.torch_graph`; IR parameter keys are state_dict names.
The modules behind this one: :mod:`.torch_detect` (which format a file is), :mod:`.torch_formats` (one
class per format), :mod:`.safetensors_io` (safetensors files and shards), :mod:`.torch_checkpoint`
(checkpoint dicts and ``--arch``), :mod:`.torch_module` (module -> IR, tensors in and out of the
runtime). This module keeps the names other code imports.
"""

from __future__ import annotations

from pathlib import Path

from .base import LoadOptions
from .torch_detect import archive_records, detect, detect_torch_format
from .torch_formats import FORMAT_CLASSES, FORMATS, TorchModel
from .torch_module import (  # noqa: F401 - _-names: used by pathcond_cli.api
    Shapes,
    flatten_outputs,
    ordered_shapes,
    reference_tensor,
    as_model_inputs,
    export_module,
    exported_to_graph,
    floating_dtypes,
    input_specs,
    module_to_graph,
    module_translation,
    stored_layout,
)


def load_torch(path: Path, options: LoadOptions | None = None) -> TorchModel:
    """Read a torch file (format told from its content) and build its IR. Never writes anything."""
    path = Path(path)
    options = options or LoadOptions()
    fmt, content = detect(path, options)
    model = FORMAT_CLASSES[fmt](path, options)
    model._load(content)
    return model


__all__ = ["FORMATS", "FORMAT_CLASSES", "TorchModel", "archive_records", "as_model_inputs", "detect_torch_format",
           "export_module", "exported_to_graph", "floating_dtypes", "input_specs", "load_torch", "module_to_graph",
           "module_translation", "stored_layout"]
