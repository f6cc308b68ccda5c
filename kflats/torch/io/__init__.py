"""Model folders written and read: a compressed folder, and an original model's.

- :func:`save_compressed` writes a compressed model to a self-contained
  folder, and :func:`load_compressed` rebuilds it, reading the folder as
  untrusted data.
- :func:`model_source` checks an original model folder (or GGUF file)
  before anything is loaded, :func:`skeleton` builds its modules without
  weights, :func:`load_model` loads it (:class:`Source` and :class:`Loaded`
  are what they return); :func:`load_pretrained` does both for a
  transformers model; :func:`model_class` is the class its config names;
  :func:`hushed` keeps the libraries quiet meanwhile; :func:`gguf_source`
  is the GGUF file a model was read from.

The files of this package:

- ``_compressed.py``: save and load of a compressed folder.
- ``_files.py``: the folder's files read as data.
- ``_manifest.py``: kflats.json, what it records and its schema.
- ``_config_files.py``: the libraries' own files (config.json, modules.json,
  the tokenizer's), and the rules they share with an original folder.
- ``_quantized_files.py``: quantized parameters, packed on save and unpacked
  on load.
- ``_build.py``: the model of a compressed folder rebuilt and checked.
- ``_original.py``: an original model folder checked, then loaded.
- ``_quiet.py``: transformers and sentence-transformers kept quiet.
"""

from kflats.torch.io._compressed import load_compressed, save_compressed
from kflats.torch.io._original import (
    Loaded,
    Source,
    gguf_source,
    hushed,
    load_model,
    load_pretrained,
    model_class,
    model_source,
    skeleton,
)

__all__ = [
    "Loaded",
    "Source",
    "gguf_source",
    "hushed",
    "load_compressed",
    "load_model",
    "load_pretrained",
    "model_class",
    "model_source",
    "save_compressed",
    "skeleton",
]
