"""The one table of HepatoQuant's class names, display names and colours.

Everything that names a tissue or region class (QuPath GeoJSON, reports, cohort tables, overlays, QuPath
project classes) reads it from here. QuPath keys a class by its name and keeps the first colour it sees for
that name; its built-in classes (Tumor, Stroma, Necrosis, ...) keep their own colours, so none of the names
below collides with a built-in one (see ../shared/QUPATH.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HepatoClass",
    "TISSUE_CLASSES",
    "TISSUE_CLASS_CODES",
    "REGION_CLASSES",
    "TUMOUR_REGION",
    "NON_TUMOUR_REGION",
    "WHOLE_TISSUE_REGION",
    "HEADLINE_INDICATORS",
    "tissue_class",
    "region_class",
]


@dataclass(frozen=True)
class HepatoClass:
    """A class as QuPath and our reports show it.

    ``code`` is the stable identifier used in files and measurement names; ``qupath_name`` is the
    classification name written to QuPath (distinct from QuPath's built-in names); ``color_rgb`` is 0-255.
    """

    code: str
    qupath_name: str
    display_name: str
    color_rgb: tuple[int, int, int]


# The seven HepatoBench tissue classes, in the order of the model heads' outputs.
TISSUE_CLASSES: tuple[HepatoClass, ...] = (
    HepatoClass("TUM", "HQ Tumour", "Tumour", (214, 39, 40)),
    HepatoClass("FIB", "HQ Fibrosis", "Fibrosis", (31, 119, 180)),
    HepatoClass("INF", "HQ Inflammation", "Inflammation", (148, 103, 189)),
    HepatoClass("NEC", "HQ Necrosis", "Necrosis", (90, 90, 90)),
    HepatoClass("NOR", "HQ Normal", "Normal tissue", (44, 160, 44)),
    HepatoClass("REA", "HQ Bile duct reaction", "Bile duct reaction", (255, 127, 14)),
    HepatoClass("STE", "HQ Steatosis", "Steatosis", (227, 207, 87)),
)
TISSUE_CLASS_CODES: tuple[str, ...] = tuple(c.code for c in TISSUE_CLASSES)

# Region classes: where a tile lies. Background is not a region.
TUMOUR_REGION = HepatoClass("tumour", "HQ Tumour region", "Tumour region", (180, 0, 60))
NON_TUMOUR_REGION = HepatoClass("non_tumour", "HQ Non-tumour region", "Non-tumour region", (0, 130, 120))
# Used when no region annotations and no segmenter are given: all detected tissue is one region.
WHOLE_TISSUE_REGION = HepatoClass("tissue", "HQ Tissue", "Whole tissue", (100, 100, 160))
REGION_CLASSES: tuple[HepatoClass, ...] = (TUMOUR_REGION, NON_TUMOUR_REGION, WHOLE_TISSUE_REGION)

# The paper's headline indicators: which tissue classes matter inside which region class.
HEADLINE_INDICATORS: dict[str, tuple[str, ...]] = {
    NON_TUMOUR_REGION.code: ("STE", "REA", "FIB", "INF"),
    TUMOUR_REGION.code: ("NEC", "FIB", "INF"),
}

_BY_CODE = {c.code: c for c in TISSUE_CLASSES + REGION_CLASSES}


def tissue_class(code: str) -> HepatoClass:
    """The tissue class with this code (TUM, FIB, ...); KeyError names the valid codes."""
    if code not in TISSUE_CLASS_CODES:
        raise KeyError(f"unknown tissue class {code!r}; expected one of {', '.join(TISSUE_CLASS_CODES)}")
    return _BY_CODE[code]


def region_class(code: str) -> HepatoClass:
    """The region class with this code (tumour, non_tumour, tissue)."""
    for c in REGION_CLASSES:
        if c.code == code:
            return c
    raise KeyError(f"unknown region class {code!r}; expected one of {', '.join(c.code for c in REGION_CLASSES)}")
