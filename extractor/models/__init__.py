"""The model repository floor: entries as data, one runtime module per format, one `FrozenBackbone` interface.

What the rest of the project uses:
    get_backbone_spec(name, ...) -> BackboneSpec   an entry resolved, with options; `.fingerprint`
    load_backbone(spec) -> FrozenBackbone          built once per process: preprocess, forward, embed
    release_backbone(spec)                         forget a built one (a served model unloaded)
    ModelRepository(folder)                        list, add, remove entries
"""

from extractor.models.backbone import FrozenBackbone, load_backbone, release_all_backbones, release_backbone
from extractor.models.preprocessing import PRESETS, Preprocessing
from extractor.models.repository import ModelRepository, backbone_names, get_backbone_spec
from extractor.models.spec import BackboneSpec

__all__ = ["PRESETS", "BackboneSpec", "FrozenBackbone", "ModelRepository", "Preprocessing", "backbone_names",
           "get_backbone_spec", "load_backbone", "release_all_backbones", "release_backbone"]
