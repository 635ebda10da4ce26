"""Image-set metrics. `quality`: in-domain quality (class accuracy, Fréchet distance, precision/recall in
the bundled MNIST classifier's features; FID/KID/precision/recall in Inception features for other sets).
`classifier`: that classifier."""
from dmd_dar.metrics.classifier import BUNDLED_CLASSIFIER, DigitClassifier, load_classifier, save_classifier
from dmd_dar.metrics.quality import (
    SPACES,
    QualityReference,
    class_accuracy,
    classifier_outputs,
    evaluate_quality,
    frechet_distance,
    kid_from_features,
    load_reference,
    precision_recall,
    real_floor,
)

__all__ = [
    "BUNDLED_CLASSIFIER",
    "DigitClassifier",
    "load_classifier",
    "save_classifier",
    "SPACES",
    "QualityReference",
    "class_accuracy",
    "classifier_outputs",
    "evaluate_quality",
    "frechet_distance",
    "kid_from_features",
    "load_reference",
    "precision_recall",
    "real_floor",
]
