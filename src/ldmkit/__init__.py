"""ldmkit: a latent-diffusion reference toolkit.

Subpackages: ``ldmkit.reference`` (NumPy formulas), ``ldmkit.engine`` (PyTorch training),
``ldmkit.export`` (ONNX export and runtime), ``ldmkit.golden`` (golden data files).
This module imports nothing heavy.
"""

__version__ = "0.1.0"
