"""topk-saturation, ``probes``: how transformers settle their top-k predictions layer by layer.

The main entry points:

- :func:`load_model` (``probes.models``): a model by spec, wrapped in a TransformerBridge;
- :func:`analyze` (``probes.analysis``): saturation layers ``s_k`` of every position of a
  text and their order statistics, as an :class:`AnalysisResult`;
- :class:`LogitLens` (``probes.lens``): the model's own final norm and unembedding;
- :func:`task_states` (``probes.tasks``): task labels of every (position, layer) state;
- :class:`TaskProbe` (``probes.probe``): the scikit-learn task probe, with
  :func:`load_probe`; :func:`run_probe` (``probes.probe_run``): probes, grouped CV and
  controls on a run folder, as a :class:`ProbeRunResult`;

Example:
    >>> from probes import analyze
    >>> r = analyze("random:llama?n_layers=3&d_model=32&n_heads=4&n_kv_heads=2&d_mlp=64",
    ...             "text:Once upon a time there was a tiny model.", top_k=3,
    ...             n_permutations=0, progress=False)
    >>> list(r.table.columns[:5])
    ['window', 'position', 'token_id', 'token', 'next_token_id']
"""

from probes.analysis import AnalysisOptions, AnalysisResult, analyze, load_run
from probes.corpus import Document, Window, make_windows, read_text
from probes.errors import TopkSaturationError
from probes.lens import LogitLens
from probes.models import LoadedModel, ModelInfo, load_model
from probes.probe import TaskProbe, load_probe
from probes.probe_run import ProbeRunResult, run_probe
from probes.saturation import saturation_from_matches, saturation_layers
from probes.tasks import LABEL_RULES, task_states

__version__ = "0.1.0"

__all__ = [
    "LABEL_RULES",
    "AnalysisOptions",
    "AnalysisResult",
    "Document",
    "LoadedModel",
    "LogitLens",
    "ModelInfo",
    "ProbeRunResult",
    "TaskProbe",
    "TopkSaturationError",
    "Window",
    "__version__",
    "analyze",
    "load_model",
    "load_probe",
    "load_run",
    "make_windows",
    "read_text",
    "run_probe",
    "saturation_from_matches",
    "saturation_layers",
    "task_states",
]
