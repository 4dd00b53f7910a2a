"""bcllm: block-circulant linear layers for pretrained language models, run with the FFT."""

from .io.artifact import export_student, load_student
from .ops.circulant import project_frobenius, spectra, to_dense
from .errors import InputError
from .io.models import DEFAULT_MODEL, load_model
from .structures import (STRUCTURES, BlockCirculantLinear, BlockDiagonalConfig, CirculantConfig, HybridConfig,
                         LowRankConfig, register)
from .fit.student import StudentIO, StudentSpec, build_student
from .eval.student import evaluate_student, generate_side_by_side
from .surgery import compress_, select_modules

__version__ = "0.1.0"

__all__ = ["BlockCirculantLinear", "CirculantConfig", "LowRankConfig", "BlockDiagonalConfig", "HybridConfig",
           "STRUCTURES", "register", "compress_", "select_modules", "load_model", "DEFAULT_MODEL",
           "StudentSpec", "StudentIO", "build_student", "evaluate_student", "generate_side_by_side", "load_student", "export_student", "InputError", "project_frobenius", "spectra", "to_dense",
           "__version__"]
