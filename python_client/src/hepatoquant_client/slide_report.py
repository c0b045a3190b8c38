"""A slide's analysis as its versioned report holds it: the one typed result every entry point hands on.

The server writes the report once (``<slide>.report.json``); :class:`SlideReport` reads it and turns it into
what each entry point needs: the API's result message (:meth:`SlideReport.to_proto`), one cohort-table row
(:meth:`SlideReport.to_row`, the only definition of a row: the per-slide ``<slide>.csv``, ``cohort run``'s
``cohort.csv`` and the client's tables all come from it, so their rows concatenate) and the report itself
(:meth:`SlideReport.to_report`). Only the standard library and the generated proto module are imported.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .classes import HEADLINE_INDICATORS, TISSUE_CLASS_CODES
from .errors import ReportFormatError
from .proto import pb

__all__ = [
    "COHORT_REGION_CLASSES",
    "ClassShare",
    "RegionShare",
    "SlideReport",
    "TEXT_COLUMNS",
    "cohort_columns",
    "composition_columns",
]

#: Region classes with columns of their own, in column order (``unassigned``: tiles outside every region).
COHORT_REGION_CLASSES: tuple[str, ...] = ("tumour", "non_tumour", "tissue", "unassigned")

_LEADING_COLUMNS = ("slide", "job_id", "slide_path", "model", "model_status", "segmenter", "segmenter_status",
                    "mpp_um_px", "tissue_area_mm2", "tile_count")
#: The columns holding text; ``tile_count`` and ``*_tiles`` hold integers, every other column a float.
TEXT_COLUMNS = frozenset({"slide", "job_id", "slide_path", "model", "model_status", "segmenter", "segmenter_status"})


def cohort_columns() -> list[str]:
    """The cohort table's column names, the same for every cohort: slide and models, then
    :func:`composition_columns`."""
    return [*_LEADING_COLUMNS, *composition_columns()]


def composition_columns() -> list[str]:
    """Per region class its area, tile count, tile area and the percent of each tissue class, then the headline
    indicators."""
    columns: list[str] = []
    for region_class in COHORT_REGION_CLASSES:
        columns += [f"{region_class}_region_area_mm2", f"{region_class}_tiles", f"{region_class}_tile_area_mm2"]
        columns += [f"{region_class}_{code}_pct" for code in TISSUE_CLASS_CODES]
    for region_class, codes in HEADLINE_INDICATORS.items():
        columns += [f"headline_{region_class}_{code}_pct" for code in codes]
    return columns


@dataclass(frozen=True)
class ClassShare:
    """One tissue class within a region: tile count, tile area (mm^2) and percent of the region's tiles.

    ``percent`` is ``None`` when the region has no tiles: no data, which is not 0 %."""

    code: str
    tiles: int
    area_mm2: float
    percent: float | None

    @classmethod
    def from_proto(cls, message: pb.ClassComposition) -> ClassShare:
        percent = message.percent if message.HasField("percent") else None
        return cls(message.code, int(message.tiles), message.area_mm2, percent)

    def to_proto(self) -> pb.ClassComposition:
        return pb.ClassComposition(code=self.code, tiles=self.tiles, area_mm2=self.area_mm2, percent=self.percent)


@dataclass(frozen=True)
class RegionShare:
    """The composition of one region (or of all regions of one region class).

    ``region_class`` is tumour, non_tumour, tissue or unassigned; ``source`` is user, segmenter, tissue or
    aggregate; ``region_area_mm2`` is the polygon area (``None`` in a report, 0 in the API, for unassigned
    tiles: they have no polygon); ``tile_area_mm2`` the area of the classified tiles in it.
    """

    name: str
    region_class: str
    source: str
    region_area_mm2: float | None
    tile_count: int
    tile_area_mm2: float
    classes: tuple[ClassShare, ...]

    @classmethod
    def from_proto(cls, message: pb.RegionComposition) -> RegionShare:
        return cls(
            name=message.name,
            region_class=message.region_class,
            source=message.source,
            region_area_mm2=message.region_area_mm2,
            tile_count=int(message.tile_count),
            tile_area_mm2=message.tile_area_mm2,
            classes=tuple(ClassShare.from_proto(c) for c in message.classes),
        )

    @classmethod
    def from_report(cls, entry: Mapping[str, Any]) -> RegionShare:
        """From one entry of a report's ``composition.regions`` / ``composition.region_classes``."""
        percents = entry["class_percent"]  # null: the region has no tiles
        area = entry["region_area_mm2"]
        return cls(
            name=entry["name"],
            region_class=entry["region_class"],
            source=entry["source"],
            region_area_mm2=None if area is None else float(area),
            tile_count=int(entry["tile_count"]),
            tile_area_mm2=float(entry["tile_area_mm2"]),
            classes=tuple(
                ClassShare(code, int(tiles), float(entry["class_area_mm2"][code]),
                           None if percents is None else float(percents[code]))
                for code, tiles in entry["class_tiles"].items()
            ),
        )

    def to_proto(self) -> pb.RegionComposition:
        return pb.RegionComposition(
            name=self.name, region_class=self.region_class, source=self.source,
            region_area_mm2=self.region_area_mm2 or 0.0, tile_count=self.tile_count,
            tile_area_mm2=self.tile_area_mm2, classes=[c.to_proto() for c in self.classes],
        )

    def _region_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region_class": self.region_class,
            "source": self.source,
            "region_area_mm2": self.region_area_mm2,
            "tile_count": self.tile_count,
            "tile_area_mm2": self.tile_area_mm2,
        }

    def records(self) -> list[dict[str, Any]]:
        """Long form, one flat dict per tissue class (``pandas.DataFrame(region.records())``)."""
        base = self._region_fields()
        return [
            {**base, "code": c.code, "tiles": c.tiles, "area_mm2": c.area_mm2, "percent": c.percent}
            for c in self.classes
        ]

    def as_dict(self) -> dict[str, Any]:
        """Wide form, one flat dict: the region's fields, then ``<CODE>_tiles``, ``<CODE>_area_mm2`` and
        ``<CODE>_percent`` for each class (one row of a cohort-style table)."""
        row = self._region_fields()
        for c in self.classes:
            row[f"{c.code}_tiles"] = c.tiles
            row[f"{c.code}_area_mm2"] = c.area_mm2
            row[f"{c.code}_percent"] = c.percent
        return row

    def percent(self, code: str) -> float | None:
        """Percent of this region's tiles in class ``code`` (``None``: the region has no tiles); KeyError names
        the codes present."""
        for c in self.classes:
            if c.code == code:
                return c.percent
        raise KeyError(f"no class {code!r} in region {self.name!r}; it has {', '.join(c.code for c in self.classes)}")


@dataclass(frozen=True)
class SlideReport:
    """One slide's analysis: the composition per region and region class, the headline indicators
    (``"<region_class>/<code>"`` -> percent, only where the region class has tiles), the models' status and the
    warnings, with the full versioned report kept as written (``to_report()``)."""

    model_status: str
    regions: tuple[RegionShare, ...]
    region_classes: tuple[RegionShare, ...]
    headline_indicators: dict[str, float]
    warnings: tuple[str, ...]
    report: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_report(cls, report: Mapping[str, Any], *, source: str = "the report") -> SlideReport:
        """From a report as a dict; :class:`ReportFormatError` names ``source`` and the field that is wrong."""
        try:
            composition = report["composition"]
            return cls(
                model_status=str(report["model_status"]),
                regions=tuple(RegionShare.from_report(entry) for entry in composition["regions"]),
                region_classes=tuple(RegionShare.from_report(entry) for entry in composition["region_classes"]),
                headline_indicators={
                    f"{region_class}/{code}": float(value)
                    for region_class, values in composition["headline_indicators_percent"].items()
                    for code, value in values.items()
                    if value is not None  # a region class without tiles has no indicators
                },
                warnings=tuple(report["warnings"]),
                report=report,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReportFormatError(
                f"{source} is not a HepatoQuant report (report_schema_version "
                f"{report.get('report_schema_version') if isinstance(report, Mapping) else None!r}): "
                f"{type(exc).__name__} {exc}; write it again with this version's analysis"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "the report") -> SlideReport:
        try:
            report = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportFormatError(f"{source} is not JSON ({exc}); write it again") from None
        if not isinstance(report, dict):
            raise ReportFormatError(f"{source} is JSON but not an object; write it again")
        return cls.from_report(report, source=source)

    def to_report(self) -> dict[str, Any]:
        """The full versioned report (a copy: changing it changes nothing here)."""
        return copy.deepcopy(dict(self.report))

    def to_proto(
        self, *, job_id: str, report_json: str, qupath_geojson: bytes, cohort_csv: bytes, overlay_png: bytes,
        slide_stem: str, tissue_map_tiff: bytes = b"", region_mask_tiff: bytes = b"",
    ) -> pb.AnalysisResult:
        """The API's result message, with the outputs' files (``report_json`` is the report as written)."""
        return pb.AnalysisResult(
            job_id=job_id,
            model_status=self.model_status,
            regions=[r.to_proto() for r in self.regions],
            region_classes=[r.to_proto() for r in self.region_classes],
            headline_indicators_percent=self.headline_indicators,
            report_json=report_json,
            qupath_geojson=qupath_geojson,
            warnings=list(self.warnings),
            cohort_csv=cohort_csv,
            overlay_png=overlay_png,
            slide_stem=slide_stem,
            tissue_map_tiff=tissue_map_tiff,
            region_mask_tiff=region_mask_tiff,
        )

    def to_row(self, *, slide: str, job_id: str | None = None) -> dict[str, Any]:
        """The slide's cohort row, keys in :func:`cohort_columns` order. Cells of region classes the slide lacks,
        percentages of region classes without tiles (no data, not 0 %) and the job id of a run without a server
        stay ``None``."""
        report = self.report
        row: dict[str, Any] = dict.fromkeys(cohort_columns())
        model = report.get("model") or {}
        segmenter = report.get("segmenter") or {}
        slide_info = report.get("slide") or {}
        row.update(
            slide=slide,
            job_id=job_id or None,
            slide_path=slide_info.get("path"),
            model=model.get("name") or None,
            model_status=self.model_status or None,
            segmenter=segmenter.get("name") or None,
            segmenter_status=segmenter.get("model_status") or None,
            mpp_um_px=slide_info.get("mpp_um_px"),
            tissue_area_mm2=(report.get("tissue") or {}).get("area_mm2"),
            tile_count=(report.get("tiles") or {}).get("count"),
        )
        for entry in self.region_classes:
            prefix = entry.region_class
            if prefix not in COHORT_REGION_CLASSES:
                continue
            row[f"{prefix}_region_area_mm2"] = entry.region_area_mm2  # None for unassigned tiles: no polygon
            row[f"{prefix}_tiles"] = entry.tile_count
            row[f"{prefix}_tile_area_mm2"] = entry.tile_area_mm2
            for share in entry.classes:  # percent None: no tiles, so empty cells
                if f"{prefix}_{share.code}_pct" in row:
                    row[f"{prefix}_{share.code}_pct"] = share.percent
        for key, percent in self.headline_indicators.items():
            column = f"headline_{key.replace('/', '_')}_pct"
            if column in row:
                row[column] = percent
        return row
