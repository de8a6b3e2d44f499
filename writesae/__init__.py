"""WriteSAE: sparse autoencoders on the matrix cache writes of recurrent language models.

Entry points: :func:`load_host` (a model as cells you can trace and edit), :class:`Edit`,
:class:`WriteSAE` / :class:`SAEConfig`, :func:`train_sae`, :func:`extract`.
"""
__version__ = "0.1.0"

from .hosts import Cell, Edit, load_host  # noqa: E402
from .sae import SAEConfig, WriteSAE  # noqa: E402
from .train import train_sae  # noqa: E402
from .extract import extract  # noqa: E402

__all__ = ["Cell", "Edit", "load_host", "SAEConfig", "WriteSAE", "train_sae", "extract", "__version__"]
