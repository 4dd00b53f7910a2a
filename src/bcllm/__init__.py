"""bcllm: block-circulant linear layers for pretrained language models, run with the FFT."""

from .circulant import project_frobenius, spectra, to_dense
from .models import DEFAULT_MODEL, load_model
from .modules import BlockCirculantLinear
from .surgery import CirculantConfig, compress_, select_modules

__version__ = "0.1.0"

__all__ = ["BlockCirculantLinear", "CirculantConfig", "compress_", "select_modules", "load_model",
           "DEFAULT_MODEL", "project_frobenius", "spectra", "to_dense", "__version__"]
