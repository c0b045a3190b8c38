"""Tumour / non-tumour region segmentation: a LoRA-adapted foundation model with a light decoder.

Label values used everywhere in this package (masks, logits channels, metrics): 0 background (no tissue),
1 non-tumour tissue, 2 tumour; 255 marks pixels to ignore in training and evaluation.
"""

SEG_CLASS_NAMES: tuple[str, ...] = ("background", "non_tumour", "tumour")
BACKGROUND, NON_TUMOUR, TUMOUR = 0, 1, 2
IGNORE_INDEX = 255

__all__ = ["SEG_CLASS_NAMES", "BACKGROUND", "NON_TUMOUR", "TUMOUR", "IGNORE_INDEX"]
