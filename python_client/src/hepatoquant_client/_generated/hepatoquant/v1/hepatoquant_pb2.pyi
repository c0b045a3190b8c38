import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_INTERRUPTED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_INTERRUPTED: JobState

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TissueClassInfo(_message.Message):
    __slots__ = ("code", "qupath_name", "display_name", "color_rgb")
    CODE_FIELD_NUMBER: _ClassVar[int]
    QUPATH_NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    COLOR_RGB_FIELD_NUMBER: _ClassVar[int]
    code: str
    qupath_name: str
    display_name: str
    color_rgb: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, code: _Optional[str] = ..., qupath_name: _Optional[str] = ..., display_name: _Optional[str] = ..., color_rgb: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelPackInfo(_message.Message):
    __slots__ = ("name", "kind", "encoder", "model_status", "classes", "spacing_um_px", "input_size_px", "licence_note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SPACING_UM_PX_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    LICENCE_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    encoder: str
    model_status: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    spacing_um_px: float
    input_size_px: int
    licence_note: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., encoder: _Optional[str] = ..., model_status: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., spacing_um_px: _Optional[float] = ..., input_size_px: _Optional[int] = ..., licence_note: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "library_versions", "models", "tissue_classes", "region_classes", "slide_roots", "max_queued_jobs", "max_message_bytes", "device", "notice")
    class LibraryVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TISSUE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    REGION_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SLIDE_ROOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    version: str
    library_versions: _containers.ScalarMap[str, str]
    models: _containers.RepeatedCompositeFieldContainer[ModelPackInfo]
    tissue_classes: _containers.RepeatedCompositeFieldContainer[TissueClassInfo]
    region_classes: _containers.RepeatedCompositeFieldContainer[TissueClassInfo]
    slide_roots: _containers.RepeatedScalarFieldContainer[str]
    max_queued_jobs: int
    max_message_bytes: int
    device: str
    notice: str
    def __init__(self, version: _Optional[str] = ..., library_versions: _Optional[_Mapping[str, str]] = ..., models: _Optional[_Iterable[_Union[ModelPackInfo, _Mapping]]] = ..., tissue_classes: _Optional[_Iterable[_Union[TissueClassInfo, _Mapping]]] = ..., region_classes: _Optional[_Iterable[_Union[TissueClassInfo, _Mapping]]] = ..., slide_roots: _Optional[_Iterable[str]] = ..., max_queued_jobs: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., device: _Optional[str] = ..., notice: _Optional[str] = ...) -> None: ...

class AnalysisRequest(_message.Message):
    __slots__ = ("slide", "mpp_um_px", "regions_geojson", "model", "segmenter_model", "tile_size_px", "tile_spacing_um_px", "min_tissue_fraction", "tumour_class_names", "tile_object_type", "omit_tiles", "include_embeddings", "tissue_threshold", "window_overlap", "min_focus", "keep_artefacts", "precision", "embeddings_format")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    MPP_UM_PX_FIELD_NUMBER: _ClassVar[int]
    REGIONS_GEOJSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEGMENTER_MODEL_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    TILE_SPACING_UM_PX_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TUMOUR_CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TILE_OBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OMIT_TILES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TISSUE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MIN_FOCUS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ARTEFACTS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FORMAT_FIELD_NUMBER: _ClassVar[int]
    slide: str
    mpp_um_px: float
    regions_geojson: str
    model: str
    segmenter_model: str
    tile_size_px: int
    tile_spacing_um_px: float
    min_tissue_fraction: float
    tumour_class_names: _containers.RepeatedScalarFieldContainer[str]
    tile_object_type: str
    omit_tiles: bool
    include_embeddings: bool
    tissue_threshold: int
    window_overlap: float
    min_focus: float
    keep_artefacts: bool
    precision: str
    embeddings_format: str
    def __init__(self, slide: _Optional[str] = ..., mpp_um_px: _Optional[float] = ..., regions_geojson: _Optional[str] = ..., model: _Optional[str] = ..., segmenter_model: _Optional[str] = ..., tile_size_px: _Optional[int] = ..., tile_spacing_um_px: _Optional[float] = ..., min_tissue_fraction: _Optional[float] = ..., tumour_class_names: _Optional[_Iterable[str]] = ..., tile_object_type: _Optional[str] = ..., omit_tiles: _Optional[bool] = ..., include_embeddings: _Optional[bool] = ..., tissue_threshold: _Optional[int] = ..., window_overlap: _Optional[float] = ..., min_focus: _Optional[float] = ..., keep_artefacts: _Optional[bool] = ..., precision: _Optional[str] = ..., embeddings_format: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "items_per_second", "eta_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    items_per_second: float
    eta_seconds: float
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., items_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "request", "progress", "created_at", "updated_at", "error_code", "error_message", "reused_result")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REUSED_RESULT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    request: AnalysisRequest
    progress: Progress
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    error_code: str
    error_message: str
    reused_result: bool
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[AnalysisRequest, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., reused_result: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class ClassComposition(_message.Message):
    __slots__ = ("code", "tiles", "area_mm2", "percent")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    code: str
    tiles: int
    area_mm2: float
    percent: float
    def __init__(self, code: _Optional[str] = ..., tiles: _Optional[int] = ..., area_mm2: _Optional[float] = ..., percent: _Optional[float] = ...) -> None: ...

class RegionComposition(_message.Message):
    __slots__ = ("name", "region_class", "source", "region_area_mm2", "tile_count", "tile_area_mm2", "classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_CLASS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REGION_AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TILE_AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    region_class: str
    source: str
    region_area_mm2: float
    tile_count: int
    tile_area_mm2: float
    classes: _containers.RepeatedCompositeFieldContainer[ClassComposition]
    def __init__(self, name: _Optional[str] = ..., region_class: _Optional[str] = ..., source: _Optional[str] = ..., region_area_mm2: _Optional[float] = ..., tile_count: _Optional[int] = ..., tile_area_mm2: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[ClassComposition, _Mapping]]] = ...) -> None: ...

class AnalysisResult(_message.Message):
    __slots__ = ("job_id", "model_status", "regions", "region_classes", "headline_indicators_percent", "report_json", "qupath_geojson", "warnings", "cohort_csv", "overlay_png", "slide_stem", "tissue_map_tiff", "region_mask_tiff")
    class HeadlineIndicatorsPercentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REGION_CLASSES_FIELD_NUMBER: _ClassVar[int]
    HEADLINE_INDICATORS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    QUPATH_GEOJSON_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    COHORT_CSV_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    SLIDE_STEM_FIELD_NUMBER: _ClassVar[int]
    TISSUE_MAP_TIFF_FIELD_NUMBER: _ClassVar[int]
    REGION_MASK_TIFF_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_status: str
    regions: _containers.RepeatedCompositeFieldContainer[RegionComposition]
    region_classes: _containers.RepeatedCompositeFieldContainer[RegionComposition]
    headline_indicators_percent: _containers.ScalarMap[str, float]
    report_json: str
    qupath_geojson: bytes
    warnings: _containers.RepeatedScalarFieldContainer[str]
    cohort_csv: bytes
    overlay_png: bytes
    slide_stem: str
    tissue_map_tiff: bytes
    region_mask_tiff: bytes
    def __init__(self, job_id: _Optional[str] = ..., model_status: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[RegionComposition, _Mapping]]] = ..., region_classes: _Optional[_Iterable[_Union[RegionComposition, _Mapping]]] = ..., headline_indicators_percent: _Optional[_Mapping[str, float]] = ..., report_json: _Optional[str] = ..., qupath_geojson: _Optional[bytes] = ..., warnings: _Optional[_Iterable[str]] = ..., cohort_csv: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., slide_stem: _Optional[str] = ..., tissue_map_tiff: _Optional[bytes] = ..., region_mask_tiff: _Optional[bytes] = ...) -> None: ...

class TileBatch(_message.Message):
    __slots__ = ("images", "raw_width_px", "raw_height_px", "mpp_um_px", "model", "include_embeddings")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    RAW_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    MPP_UM_PX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    raw_width_px: int
    raw_height_px: int
    mpp_um_px: float
    model: str
    include_embeddings: bool
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., raw_width_px: _Optional[int] = ..., raw_height_px: _Optional[int] = ..., mpp_um_px: _Optional[float] = ..., model: _Optional[str] = ..., include_embeddings: _Optional[bool] = ...) -> None: ...

class TilePrediction(_message.Message):
    __slots__ = ("code", "probabilities", "embedding")
    CODE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    code: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, code: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class TilePredictions(_message.Message):
    __slots__ = ("classes", "predictions", "model_status")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATUS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    predictions: _containers.RepeatedCompositeFieldContainer[TilePrediction]
    model_status: str
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., predictions: _Optional[_Iterable[_Union[TilePrediction, _Mapping]]] = ..., model_status: _Optional[str] = ...) -> None: ...
