"""Everything about the model: demo data, preprocessing, networks, artifacts, the registry and training.

Training and serving meet here: ``train()`` publishes a version to the registry, and workers serve the
champion through ``load_champion()``, using the :class:`Preprocess` stored with it.
"""

from model.checkpoint import ArtifactError, load_checkpoint, save_checkpoint
from model.classifier import Classifier, resolve_device
from model.data import LabeledImages, load_source, open_image
from model.demo_data import CLASSES, demo_images, write_imagefolder
from model.meta import ModelMeta, new_version_id
from model.net import ARCHITECTURES, ModelConfig, build_model
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, TrainPreprocess, to_rgb
from model.registry import champion_version, list_versions, load_champion, publish, set_champion
from model.train import EpochStats, TrainConfig, TrainResult, train

__all__ = [
    "ARCHITECTURES",
    "CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArtifactError",
    "Classifier",
    "EpochStats",
    "LabeledImages",
    "ModelConfig",
    "ModelMeta",
    "Preprocess",
    "TrainConfig",
    "TrainPreprocess",
    "TrainResult",
    "build_model",
    "champion_version",
    "demo_images",
    "list_versions",
    "load_champion",
    "load_checkpoint",
    "load_source",
    "new_version_id",
    "open_image",
    "publish",
    "resolve_device",
    "save_checkpoint",
    "set_champion",
    "to_rgb",
    "train",
    "write_imagefolder",
]
