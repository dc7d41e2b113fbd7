from zeroseg.models.backbones import Backbone, TimmBackbone, TimmViTBackbone
from zeroseg.models.heads import AllMLPDecodeHead
from zeroseg.models.mit import MixTransformer

__all__ = ["AllMLPDecodeHead", "Backbone", "MixTransformer", "TimmBackbone", "TimmViTBackbone"]
