from zeroseg.models.backbones import Backbone, TimmBackbone, load_backbone_weights
from zeroseg.models.heads import AllMLPDecodeHead

__all__ = ["AllMLPDecodeHead", "Backbone", "TimmBackbone", "load_backbone_weights"]
