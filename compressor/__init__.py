"""Make trained CNNs small and fast: factorize their convs, export to ONNX, verify, report.

Python API (the ``compress`` command is a thin layer over it)::

    import compressor
    data = compressor.load_data("calibration.npz", input_shape=(1, 3, 224, 224))  # optional
    result = compressor.compress(model, "recipes/mobile.yaml", torch.randn(1, 3, 224, 224), data=data)
    result.model                         # the compressed nn.Module
    result.report                        # the content of report.json
    result.export_onnx("model.onnx")     # writes and verifies in ONNX Runtime
"""

from compressor.data import Dataset, load_data
from compressor.errors import CompressorError, ParityError
from compressor.pipeline import Plan, Result, compress, plan
from compressor.recipe import Recipe, load_recipe

__all__ = [
    "CompressorError",
    "Dataset",
    "ParityError",
    "Plan",
    "Recipe",
    "Result",
    "compress",
    "load_data",
    "load_recipe",
    "plan",
]
__version__ = "0.1.0"
