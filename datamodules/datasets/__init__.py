"""On-disk datasets in their official layouts (one module per format) and the registry that
builds them from data-config entries such as ``{dataset: coco, root: /data/coco, split: val}``."""
