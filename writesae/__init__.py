"""WriteSAE: sparse autoencoders on the matrix cache writes of recurrent language models.

Entry points: :func:`load_host` (a model as cells you can trace and edit), :class:`Edit`,
:class:`WriteSAE` / :class:`SAEConfig`, :func:`train_sae`, :func:`extract`. They are imported on first
use, so that ``import writesae`` (and the command line's ``--help``) does not load torch.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {"Cell": "hosts", "Edit": "hosts", "load_host": "hosts", "SAEConfig": "sae", "WriteSAE": "sae",
         "train_sae": "train", "extract": "extract"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'writesae' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
