"""Weight-spectrum tools: online :class:`SpectralMonitor`, offline :func:`analyze_model`,
and the :class:`SpectralStopRule` early-stopping helper.

Metric names are documented on :class:`SpectralMonitor`.
"""

from .analysis import analyze_model, load_vectors, summarize, write_report
from .common import layer_type, principal_cosines, select_matrices
from .monitor import SpectralMonitor
from .stopping import SpectralStopRule, sigma_growth

__all__ = [
    "SpectralMonitor",
    "analyze_model",
    "summarize",
    "write_report",
    "load_vectors",
    "principal_cosines",
    "layer_type",
    "select_matrices",
    "SpectralStopRule",
    "sigma_growth",
]
