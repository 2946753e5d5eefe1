"""convlens: see what a convolutional image classifier sees and why it decides as it does."""

# first: in the `convlens` command it sets OMP_NUM_THREADS / OMP_WAIT_POLICY before torch loads
from . import _cpu  # noqa: F401
from ._cpu import Threads, threads
from ._version import __version__
from .explain import explain
from .hooks import LayerCapture, model_guard
from .images import ImageError, load_image, sample_image, sample_image_path
from .layers import LayerError, default_cam_layer, layer_table, resolve_layer, resolve_layers
from .methods.activations import activations
from .methods.cam import CAM_METHODS, grad_cam
from .methods.featureviz import FeatureImages, feature_visualization
from .methods.occlusion import occlusion
from .methods.registry import cam_methods, register_cam, unregister_cam
from .metrics.compare import Comparison, compare
from .metrics.faithfulness import deletion, deletion_insertion, insertion
from .metrics.results import ClassSensitivity, DeletionInsertion, PerturbationCurve, SanityCheck, TrustSummary
from .metrics.sanity import class_sensitivity, sanity_check
from .models import (
    Classifier,
    ModelError,
    Prediction,
    as_classifier,
    imagenet_labels,
    load_model,
    model_output,
    read_labels,
)
from .report import ImageExplanation, Report
from .results import Activations, Result, Saliency
from .serve import serve  # the function; needs the extra convlens[serve] only when called
from .settings import (
    ActivationsSettings,
    CamSettings,
    ClassSensitivitySettings,
    CompareSettings,
    DeletionInsertionSettings,
    FeatureVisualizationSettings,
    OcclusionSettings,
    SanitySettings,
    Settings,
    TrustSettings,
)
from .targets import Region

__all__ = [
    "__version__",
    "Activations",
    "CAM_METHODS",
    "activations",
    "grad_cam",
    "register_cam",
    "unregister_cam",
    "cam_methods",
    "Classifier",
    "FeatureImages",
    "ImageExplanation",
    "Report",
    "explain",
    "ImageError",
    "LayerCapture",
    "LayerError",
    "ModelError",
    "Prediction",
    "Saliency",
    "as_classifier",
    "default_cam_layer",
    "feature_visualization",
    "imagenet_labels",
    "layer_table",
    "load_image",
    "load_model",
    "model_guard",
    "model_output",
    "read_labels",
    "Region",
    "occlusion",
    "deletion",
    "insertion",
    "deletion_insertion",
    "PerturbationCurve",
    "SanityCheck",
    "ClassSensitivity",
    "class_sensitivity",
    "sanity_check",
    "compare",
    "Comparison",
    "resolve_layer",
    "resolve_layers",
    "sample_image",
    "sample_image_path",
    "serve",
    "threads",
    "Threads",
    # the one shape of a result and the settings it records (issue 22.2)
    "Result",
    "DeletionInsertion",
    "TrustSummary",
    "Settings",
    "ActivationsSettings",
    "CamSettings",
    "OcclusionSettings",
    "FeatureVisualizationSettings",
    "DeletionInsertionSettings",
    "SanitySettings",
    "ClassSensitivitySettings",
    "TrustSettings",
    "CompareSettings",
]
