"""infc: ahead-of-time compiler for Apache MXNet / GluonCV models.

Importing the package is cheap: MXNet, ONNX and TensorRT load only when a
command needs them.
"""

__version__ = "0.1.0"
