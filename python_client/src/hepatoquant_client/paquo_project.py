"""Analyse every image of a QuPath project and write HepatoQuant's objects into it, through paquo.

A thin layer: it reads images and objects out of QuPath and puts objects back; what to send, what to remove and
how to nest is decided by :mod:`hepatoquant_client.project_plan`. paquo (and with it QuPath's Java classes) is
imported only when a function here runs, so importing this module costs nothing and works without QuPath.

Per image: the image's URI is mapped to a server path, the slide is analysed, and only then the previous run's
HepatoQuant objects are replaced by the new ones (a pathologist's objects are never removed). Any error for an
image leaves that image as it was and the run goes on with the next; the returned :class:`ImageOutcome` says
what happened to each image.

``import_geojson`` puts the objects of an ``analyze`` output file into one image the same way;
``export_annotations`` writes the pathologist's annotations of each image as QuPath GeoJSON files.

paquo needs a QuPath installation: set ``PAQUO_QUPATH_DIR`` to its folder (``python -m paquo get_qupath
--install-path DIR 0.6.0`` downloads one). No package registry ships QuPath.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .errors import HepatoQuantError

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client
    from .results import AnalysisOutcome
    from .project_plan import UriMapping

__all__ = [
    "ImageOutcome",
    "PaquoUnavailableError",
    "ProjectNotFoundError",
    "analyze_project",
    "export_annotations",
    "import_geojson",
    "load_paquo",
]

QUPATH_DIR_ENV = "PAQUO_QUPATH_DIR"


class PaquoUnavailableError(HepatoQuantError, RuntimeError):
    """paquo is not installed, or it cannot find a QuPath installation."""


@dataclass(frozen=True)
class ImageOutcome:
    """What happened to one image: ``status`` is ``written`` or ``failed`` (then ``error`` says why and the
    image was left as it was). ``removed`` / ``added`` count the HepatoQuant objects replaced."""

    image_name: str
    uri: str
    status: str
    slide: str | None = None
    error: str = ""
    outcome: AnalysisOutcome | None = None
    removed: int = 0
    added: int = 0


def load_paquo() -> SimpleNamespace:
    """paquo's project, class and object types; :class:`PaquoUnavailableError` names ``PAQUO_QUPATH_DIR`` when
    paquo or QuPath is missing."""
    try:
        import paquo  # noqa: F401
    except ImportError as exc:
        raise PaquoUnavailableError(
            f"paquo is not installed ({exc}); pip install 'paquo>=0.9' and point {QUPATH_DIR_ENV} at a QuPath "
            "installation (python -m paquo get_qupath --install-path DIR 0.6.0)"
        ) from exc
    try:  # importing these starts the JVM from QuPath's installation
        from jpype import JClass
        from paquo.classes import QuPathPathClass
        from paquo.java import GsonTools, String, compatibility
        from paquo.projects import QuPathProject

        java_path_object = JClass("qupath.lib.objects.PathObject")
    except Exception as exc:  # paquo raises several types when QuPath is missing or broken
        where = os.environ.get(QUPATH_DIR_ENV)
        hint = f"{QUPATH_DIR_ENV}={where!r} holds no usable QuPath" if where else f"{QUPATH_DIR_ENV} is not set"
        raise PaquoUnavailableError(
            f"paquo cannot start QuPath ({type(exc).__name__}: {exc}); {hint}. Set {QUPATH_DIR_ENV} to a QuPath "
            "installation folder (python -m paquo get_qupath --install-path DIR 0.6.0 downloads one)"
        ) from exc
    def object_from_geojson(feature: dict) -> Any:
        # Read as PathObject so QuPath's type adapter makes the right kind (annotation, detection, tile) from
        # objectType, with the children in properties.childObjects (the only place QuPath reads them; a
        # childObjects beside properties is dropped silently); paquo's from_geojson would force an annotation.
        return GsonTools.getInstance().fromJson(String(json.dumps(feature)), java_path_object)

    def add_objects(java_hierarchy: Any, objects: list[Any]) -> None:
        # addPathObjects was removed in QuPath 0.6 (addObjects replaces it): paquo's own version switch.
        (java_hierarchy.addObjects if compatibility.supports_addobjects else java_hierarchy.addPathObjects)(objects)

    return SimpleNamespace(QuPathProject=QuPathProject, QuPathPathClass=QuPathPathClass,
                           object_from_geojson=object_from_geojson, add_objects=add_objects)


class ProjectNotFoundError(HepatoQuantError, FileNotFoundError):
    """The folder given holds no QuPath project (``project.qpproj``)."""


def _project_folder(project_path: str | os.PathLike[str]) -> Path:
    folder = Path(project_path)
    if folder.name == "project.qpproj":
        folder = folder.parent
    if not (folder / "project.qpproj").is_file():
        raise ProjectNotFoundError(
            f"{folder} is not a QuPath project (no project.qpproj in it); give the project folder"
        )
    return folder


def _selected(entries: list[Any], images: Iterable[str] | None, folder: Path) -> list[Any]:
    """The entries named in ``images`` (all when None); an unknown name raises before anything is written."""
    if images is None:
        return entries
    wanted = set(images)
    known = {e.image_name for e in entries}
    missing = sorted(wanted - known)
    if missing:
        raise ValueError(f"no image named {', '.join(map(repr, missing))} in {folder}; it has "
                         f"{', '.join(sorted(map(repr, known))) or 'no images'}")
    return [e for e in entries if e.image_name in wanted]


def analyze_project(
    project_path: str | os.PathLike[str],
    client: Client,
    *,
    mappings: Sequence[UriMapping],
    images: Iterable[str] | None = None,
    region_class: str | Sequence[str] | None = None,
    **options: Any,
) -> list[ImageOutcome]:
    """Analyse the images of the QuPath project at ``project_path`` (its folder or its ``project.qpproj``) and
    write the results into it.

    ``mappings`` turn image URIs into server paths (:func:`project_plan.map_image_uri`); ``images`` limits the
    run to these image names (an unknown name raises ``ValueError`` before anything is written);
    ``region_class`` names the QuPath class(es) of the pathologist's annotations sent as the regions (the
    ``tumour_class_names`` option says which of them are tumour); other ``options`` go to
    :meth:`Client.analyze`. The project's classes gain HepatoQuant's classes and colours."""
    folder = _project_folder(project_path)
    if not mappings:
        raise ValueError("no URI mappings: give at least one FROM=TO so that image paths can be sent to the server")
    class_names = (region_class,) if isinstance(region_class, str) else tuple(region_class or ())
    pq = load_paquo()
    outcomes: list[ImageOutcome] = []
    with pq.QuPathProject(str(folder), mode="a") as project:
        entries = _selected(list(project.images), images, folder)
        _add_project_classes(project, pq)
        for entry in entries:
            outcomes.append(_analyze_entry(entry, client, pq, mappings, class_names, options))
    return outcomes


def import_geojson(
    project_path: str | os.PathLike[str], image_name: str, geojson_path: str | os.PathLike[str]
) -> ImageOutcome:
    """Put the HepatoQuant objects of a GeoJSON file (an ``analyze`` output) into one image of the project,
    replacing the previous run's objects. The file must hold only HepatoQuant objects (else ``ValueError``,
    nothing written): objects without our markers could never be replaced by a later run."""
    from .qupath_geojson import read_qupath_geojson

    folder = _project_folder(project_path)
    new = read_qupath_geojson(geojson_path)  # a bad file fails here, before QuPath starts
    pq = load_paquo()
    with pq.QuPathProject(str(folder), mode="a") as project:
        [entry] = _selected(list(project.images), [image_name], folder)
        _add_project_classes(project, pq)
        handles, existing = _existing_objects(entry)
        removed, added = _write_objects(entry, pq, handles, existing, new)
    return ImageOutcome(str(entry.image_name), str(entry.uri), "written", removed=removed, added=added)


def export_annotations(
    project_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    images: Iterable[str] | None = None,
    class_names: Iterable[str] | None = None,
) -> list[Path]:
    """Write each image's own annotations (never HepatoQuant's) as ``<image name>.geojson`` in ``out_dir``, in
    the QuPath GeoJSON that ``analyze --regions`` and QuPath read; ``class_names`` keeps only annotations of
    these classes (``"Tumor"``, or ``"Tumor: Positive"`` for a derived class). Images without any such
    annotation get no file. Each file is written atomically. Returns the files written."""
    from .results import write_atomically
    from .hepatoquant_objects import is_hepatoquant_object
    from .qupath_geojson import dumps_feature_collection

    folder = _project_folder(project_path)
    wanted = None if class_names is None else set(class_names)
    target = Path(out_dir)
    pq = load_paquo()
    written: list[Path] = []
    with pq.QuPathProject(str(folder), mode="r") as project:
        entries = _selected(list(project.images), images, folder)
        names = [_file_stem(str(e.image_name)) for e in entries]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ValueError(f"images {', '.join(clashes)} would share one file name; export them one by one")
        target.mkdir(parents=True, exist_ok=True)
        for entry, stem in zip(entries, names):
            _, existing = _existing_objects(entry)
            keep = [o for o in existing if o.object_type == "annotation" and not is_hepatoquant_object(o)
                    and (wanted is None or ": ".join(o.class_names) in wanted)]
            if keep:
                path = target / f"{stem}.geojson"
                write_atomically(path, dumps_feature_collection(keep).encode("utf-8"))
                written.append(path)
    return written


def _file_stem(image_name: str) -> str:
    """A file name for an image name: path separators and characters unsafe in file names become ``_``."""
    stem = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in image_name).strip(" .")
    return stem or "image"


def _add_project_classes(project: Any, pq: SimpleNamespace) -> None:
    """HepatoQuant's classes with their colours, added to the project's own (which are kept)."""
    from .project_plan import project_classes

    present = {c.name for c in project.path_classes}
    additions = [pq.QuPathPathClass(name, color=rgb) for name, rgb in project_classes() if name not in present]
    if additions:
        project.path_classes = list(project.path_classes) + additions


def _existing_objects(entry: Any) -> tuple[list[Any], list[Any]]:
    """The image's paquo objects and the same as QuPathObjects, index for index."""
    from .qupath_geojson import parse_qupath_geojson

    name = str(entry.image_name)
    hierarchy = entry.hierarchy
    handles = list(hierarchy.annotations) + list(hierarchy.detections)
    existing = [
        parse_qupath_geojson(json.dumps(h.to_geojson()), source=f"{name} object {i}")[0]
        for i, h in enumerate(handles)
    ]
    return handles, existing


def _write_objects(entry: Any, pq: SimpleNamespace, handles: list[Any], existing: list[Any],
                   new: Sequence[Any]) -> tuple[int, int]:
    """Replace the image's HepatoQuant objects by ``new`` (nested under their regions) and save the image;
    every conversion happens before the hierarchy changes. Returns (removed, added)."""
    from .hepatoquant_objects import is_hepatoquant_object
    from .project_plan import nested_features, plan_replacement
    from .qupath_geojson import check_qupath_nesting

    plan = plan_replacement(existing, new)
    remove_java = [handles[i].java_object for i, o in enumerate(existing) if is_hepatoquant_object(o)]
    features = nested_features(plan.to_add)  # children inside properties.childObjects, as QuPath reads them
    check_qupath_nesting(features, what=f"HepatoQuant object for image {str(entry.image_name)!r}")
    add_java = [pq.object_from_geojson(feature) for feature in features]
    _replace(entry.hierarchy, remove_java, add_java, pq.add_objects)
    save = getattr(entry, "save", None)
    if callable(save):
        save()
    return len(remove_java), len(plan.to_add)


def _analyze_entry(entry: Any, client: Client, pq: SimpleNamespace, mappings: Sequence[UriMapping],
                   class_names: tuple[str, ...], options: dict[str, Any]) -> ImageOutcome:
    """One image, in its own try: every fallible step runs before the hierarchy is touched."""
    from .hepatoquant_objects import is_hepatoquant_object
    from .project_plan import map_image_uri
    from .qupath_geojson import dumps_feature_collection

    name, uri = str(entry.image_name), str(entry.uri)
    slide: str | None = None
    try:
        slide = map_image_uri(uri, mappings)
        handles, existing = _existing_objects(entry)
        request = dict(options)
        if class_names:
            regions = [o for o in existing if o.object_type == "annotation" and not is_hepatoquant_object(o)
                       and o.class_names and ": ".join(o.class_names) in class_names]
            if not regions:
                raise ValueError(f"no annotation of class {', '.join(class_names)} in image {name!r}")
            request["regions_geojson"] = dumps_feature_collection(regions)
        outcome = client.analyze(slide, **request)
        removed, added = _write_objects(entry, pq, handles, existing, outcome.qupath_objects())
    except Exception as exc:  # noqa: BLE001  one image's failure must not stop the others
        return ImageOutcome(name, uri, "failed", slide=slide, error=f"{type(exc).__name__}: {exc}")
    return ImageOutcome(name, uri, "written", slide=slide, outcome=outcome, removed=removed, added=added)


def _replace(hierarchy: Any, remove_java: list[Any], add_java: list[Any], add_objects: Any) -> None:
    """Add the new objects, then remove the old ones; on failure, undo what was done."""
    java = hierarchy.java_object
    add_objects(java, add_java)
    try:
        if remove_java:
            java.removeObjects(remove_java, True)
    except BaseException:
        java.removeObjects(add_java, False)
        raise
    finally:
        flush = getattr(hierarchy, "flush", None)
        if callable(flush):
            flush(invalidate_proxy_cache=True)
