"""raytrain-cls: timm's image-classification training recipe as a Ray Train service."""

__version__ = "0.1.0"
