"""Make trained CNNs small and fast: factorize their convs, export to ONNX, verify, report.

Python API (the ``compress`` command is a thin layer over it)::

    import compressor
    result = compressor.compress(model, "recipes/mobile.yaml", torch.randn(1, 3, 224, 224))
    result.model                         # the compressed nn.Module
    result.report                        # the content of report.json
    result.export_onnx("model.onnx")     # writes and verifies in ONNX Runtime
"""

from compressor.errors import CompressorError, ParityError
from compressor.pipeline import Plan, Result, compress, plan
from compressor.recipe import Recipe, load_recipe

__all__ = ["CompressorError", "ParityError", "Plan", "Recipe", "Result", "compress", "load_recipe", "plan"]
__version__ = "0.1.0"
