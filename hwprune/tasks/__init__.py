"""Tasks: what a model is trained and judged on (classification of images, distillation of a sentence
encoder). The pipeline asks its task for batches, the loss, the quality measure, the example input
and the ONNX inputs; it never looks at the data itself."""

from .base import Task
from .classification import ClassificationTask

__all__ = ["Task", "ClassificationTask"]
