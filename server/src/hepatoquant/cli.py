"""The ``hepatoquant`` command line: ``analyze`` a slide, ``models list`` / ``models add``, ``serve``, ``demo``,
``seg train`` / ``seg eval`` and the HepatoBench protocol, ``bench curate | split | extract | probe | compare``.

Heavy modules (torch, timm, OpenSlide) are imported inside the commands, so ``--help`` is instant and
offline. Our errors become one line on stderr and exit code 2; nothing is written when a command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hepatoquant import RESEARCH_USE_NOTICE, __version__

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hepatoquant",
        description="Liver tissue quantification on whole-slide images. " + RESEARCH_USE_NOTICE,
    )
    parser.add_argument("--version", action="version", version=f"hepatoquant {__version__}")
    parser.add_argument(
        "--models-dir", type=Path, default=None,
        help="folder of model packs (default: $HEPATOQUANT_MODELS_DIR or ~/.local/share/hepatoquant/models)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="analyse one slide: tissue composition per region")
    analyze.add_argument("slide", type=Path, help="slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, ...)")
    analyze.add_argument("--regions", type=Path, help="QuPath GeoJSON of region annotations (e.g. tumour outlines)")
    analyze.add_argument("--mpp", type=float, help="pixel size in um/px, for slides without it in their metadata")
    analyze.add_argument("--out", type=Path, default=Path("hepatoquant-results"), help="output folder")
    _add_request_flags(analyze)
    analyze.add_argument("--batch-size", type=int, default=32)
    analyze.add_argument("--workers", type=int, default=2, help="parallel tile readers")
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_machine_flags(analyze)
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    analyze.add_argument("--profile", type=Path, metavar="TRACE.json",
                         help="also write where the time went: the stages as a Chrome trace (open in "
                              "ui.perfetto.dev) and Python's profile beside it (TRACE.pstats: snakeviz, pstats)")

    models = commands.add_parser("models", help="list or add model packs")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list", help="list the model packs and registered encoders")
    add = model_commands.add_parser("add", help="turn a checkpoint (a local file, or from the Hugging Face Hub) into a model pack")
    add.add_argument("checkpoint", type=Path, nargs="?", help="encoder weights (pytorch_model.bin, .pth or .safetensors)")
    add.add_argument("--from-hub", metavar="REPO", help="download the weights from this Hugging Face Hub repository "
                     "instead (e.g. MahmoodLab/UNI: gated; your token from HF_TOKEN or `hf auth login`; the hub's "
                     "cache is reused; HF_HUB_OFFLINE=1 uses the cache only)")
    add.add_argument("--hub-file", help="the file in --from-hub (default: the one the encoder's publishers name)")
    add.add_argument("--revision", help="a branch, tag or commit of --from-hub (default: main)")
    add.add_argument("--encoder", help="registered encoder the checkpoint belongs to (uni, virchow2, gigapath, ...); "
                     "with --from-hub, found from the repository when left out")
    add.add_argument("--name", required=True, help="name of the new pack")
    add.add_argument("--head", type=Path, help="linear head weights (weight [7, dim], bias [7]); without it an encoder-only pack")
    add.add_argument("--classes", nargs="+", help="the head's class names in output order (default: TUM FIB INF NEC "
                     "NOR REA STE); codes or display names")
    add.add_argument("--overwrite", action="store_true", help="replace an existing pack of that name")
    head = model_commands.add_parser("import-head", help="a trained linear classifier (state dict) as a classifier pack")
    head.add_argument("head", type=Path, help="weight [classes, dim] and bias [classes], bare or under head./fc./"
                      "classifier./linear. (.pth, .bin or .safetensors)")
    head.add_argument("--encoder", required=True, help="registered encoder the head was trained on (uni, virchow2, ...)")
    head.add_argument("--encoder-weights", type=Path, required=True, help="that encoder's own checkpoint")
    head.add_argument("--classes", nargs="+", required=True, help="the head's class names in output order")
    head.add_argument("--name", required=True, help="name of the new pack")
    head.add_argument("--tile-size-px", type=int, default=150,
                      help="tile side in px at the encoder's spacing (0.5 um/px) the head was trained on (default 150)")
    head.add_argument("--overwrite", action="store_true", help="replace an existing pack of that name")
    pfm = model_commands.add_parser("import-pfmseg", help="a PFM_Segmentation checkpoint as a segmenter pack")
    pfm.add_argument("--checkpoint", type=Path, required=True,
                     help="best_lora_and_decoder_head.pth (lora) or best_decoder_head.pth (frozen)")
    pfm.add_argument("--backbone", required=True, help="registered encoder it was trained on (uni, uni2_h, virchow, virchow2, gigapath, "
                          "phikon, phikon_v2, hoptimus0, hoptimus1, conch_v15, lunit_vits8)")
    pfm.add_argument("--backbone-weights", type=Path, required=True, help="that foundation model's own checkpoint")
    pfm.add_argument("--classes", nargs="+", required=True,
                     help="the checkpoint's output channels in order, each background, non_tumour or tumour")
    pfm.add_argument("--name", required=True, help="name of the new pack")
    pfm.add_argument("--spacing-um-px", type=float, required=True, help="um/px of the images it was trained on")
    pfm.add_argument("--input-size", type=int, help="window side in px (default: the encoder's, 224); a multiple "
                     "of the patch size")
    pfm.add_argument("--lora-scaling", choices=("alpha", "alpha/r"),
                     help="how their LoRALinear scaled the LoRA path: alpha (self.scale = lora_alpha, as in "
                     "PFM_Segmentation's models/lora.py at ca80211 and f83b1e9; the default unless the checkpoint's "
                     "config names one) or alpha/r (a models/lora.py with self.scale = lora_alpha / r, as at their "
                     "commit 4bf40a9 or in a fork)")
    pfm.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the checkpoint's config)")
    pfm.add_argument("--overwrite", action="store_true", help="replace an existing pack of that name")
    demo = commands.add_parser("demo", help="the main job through the server: start it, submit, watch, fetch, stop")
    demo.add_argument("slide", type=Path, help="slide to analyse")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    demo.add_argument("--model", default="demo", help="classifier pack (default: the untrained demo)")
    demo.add_argument("--seg-model", default="demo-seg", help="segmenter pack, or none (default: the untrained demo)")

    serve = commands.add_parser("serve", help="run the gRPC server and the HTTP/JSON gateway")
    serve.add_argument("--slide-root", type=Path, action="append", default=[], required=True,
                       help="folder slides may be read from (repeatable); nothing outside is served")
    serve.add_argument("--state-dir", type=Path, default=Path(os.environ.get("HEPATOQUANT_STATE_DIR", "hepatoquant-state")),
                       help="job database and results (default: $HEPATOQUANT_STATE_DIR or ./hepatoquant-state)")
    serve.add_argument("--host", default="[::]", help="gRPC bind address")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port")
    serve.add_argument("--http-host", default="0.0.0.0", help="HTTP/JSON gateway bind address")
    serve.add_argument("--http-port", type=int, default=8080, help="HTTP/JSON gateway port")
    serve.add_argument("--model", default="demo", help="default classifier pack")
    serve.add_argument("--seg-model", default=os.environ.get("HEPATOQUANT_SEG_MODEL", "none"), help="default segmenter pack")
    serve.add_argument("--device", default="auto")
    _add_machine_flags(serve)
    serve.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="encoder precision (auto: bf16 on CPUs with AVX512-BF16/AMX and on GPUs, else fp32)")
    serve.add_argument("--workers", type=int, default=1, help="jobs run at once (one per device is safest)")
    serve.add_argument("--max-queued", type=int, default=16, help="queued jobs beyond which submissions are refused")
    serve.add_argument("--max-results", type=int, default=None, help="keep only this many newest results")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="one line per request and job event, as key=value text or JSON objects")
    serve.add_argument("--rebuild-job-store", action="store_true",
                       help="set a damaged job database aside and rebuild the job list from the result folders")
    serve.add_argument("--max-tile-px", type=int, default=2048,
                       help="largest ClassifyTiles image, pixels a side, checked before decoding (default 2048)")
    limits = serve.add_argument_group("limits", "what one client or one bad moment may take (beyond: refused, not hung)")
    limits.add_argument("--max-concurrent-rpcs", type=int, default=2048,
                        help="gRPC calls at once, streams included; beyond: RESOURCE_EXHAUSTED (default 2048)")
    limits.add_argument("--max-streams-per-client", type=int, default=100,
                        help="open streams per client connection; beyond: RESOURCE_EXHAUSTED (default 100)")
    limits.add_argument("--max-message-mb", type=int, default=64, help="largest request or reply, MiB (default 64)")
    limits.add_argument("--rpc-threads", type=int, default=16,
                        help="threads for blocking work (job store, slides, ClassifyTiles); streams hold none (default 16)")
    limits.add_argument("--http-max-connections", type=int, default=1024,
                        help="HTTP connections at once; beyond: 503 (default 1024)")
    limits.add_argument("--http-idle-seconds", type=float, default=5.0,
                        help="an HTTP connection silent this long is closed, half-sent requests too (default 5)")
    limits.add_argument("--handshake-seconds", type=float, default=5.0,
                        help="a new connection's time for its TLS (and gRPC's HTTP/2) handshake (default 5)")
    limits.add_argument("--min-free-mb", type=int, default=64,
                        help="health is NOT_SERVING below this much free space on the state disk (default 64)")
    serve.add_argument("--token-file", type=Path, help="file with the bearer token clients must send ($HEPATOQUANT_TOKEN also works)")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate for gRPC TLS and HTTPS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")

    seg = commands.add_parser("seg", help="train and evaluate the tumour / non-tumour segmenter")
    seg_commands = seg.add_subparsers(dest="seg_command", required=True)
    train = seg_commands.add_parser("train", help="train LoRA + decoder from a JSON config; writes a segmenter pack")
    train.add_argument("config", type=Path, help="training config (schema: hepatoquant/schemas/seg_train.schema.json)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    evaluate = seg_commands.add_parser("eval", help="score a segmenter pack: IoU, Dice, precision, recall, F1")
    evaluate.add_argument("--model", required=True, help="segmenter pack name or folder")
    evaluate.add_argument("--pairs", type=Path, help="PFM_Segmentation-style JSON of image / mask pairs")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--slide", type=Path, action="append", default=[], help="slide with ground truth (repeatable)")
    evaluate.add_argument("--annotations", type=Path, action="append", default=[], help="QuPath GeoJSON for each --slide")
    evaluate.add_argument("--mpp", type=float, help="pixel size override for the slides")
    evaluate.add_argument("--rest-of-tissue", choices=("non_tumour", "ignore"), default="non_tumour",
                          help="label of detected tissue outside every annotation")
    evaluate.add_argument("--out", type=Path, default=Path("hepatoquant-results"), help="folder for the JSON and Markdown")
    evaluate.add_argument("--device", default="auto")
    _add_bench_parser(commands)
    _add_cohort_parser(commands)
    return parser


def _add_machine_flags(parser: argparse.ArgumentParser) -> None:
    """What runs the models and reads the slide: a machine's choices (Runtime), the same for analyze, serve and
    cohort run."""
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                        help="what runs the classifier and the segmenter: auto (OpenVINO on a CPU, PyTorch on a "
                        "GPU), torch, openvino")
    parser.add_argument("--readers", choices=("auto", "threads", "processes"), default="auto",
                        help="who reads tiles and windows: auto (processes on a GPU, where threads of this process "
                        "cap the rate; threads on a CPU), threads, processes")


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of an ``AnalysisRequest`` that are the same for every slide (``analyze`` and ``cohort run``
    share them; ``hepatoquant.analysis_request.CLI_FLAGS`` maps them to the request's fields). Defaults are
    None: absent means "not given", resolved in one place (``analysis_request.resolve_options``)."""
    parser.add_argument("--model", default="demo", help="classifier pack name or folder (default: the demo pack)")
    parser.add_argument(
        "--seg-model", default=os.environ.get("HEPATOQUANT_SEG_MODEL", "none"),
        help="segmenter pack for tumour / non-tumour regions, or 'none' for the whole tissue as one region "
        "(default: $HEPATOQUANT_SEG_MODEL or none; 'demo-seg' is the untrained demo). --regions wins over it",
    )
    parser.add_argument("--window-overlap", type=float, help="segmentation window overlap fraction (default 0.25)")
    parser.add_argument("--tile-size", type=int, help="tile size in px at --tile-spacing (default: the pack's, 150)")
    parser.add_argument("--tile-spacing", type=float, help="tile resolution in um/px (default: the pack's, 0.5 = 20x)")
    parser.add_argument("--min-tissue-fraction", type=float,
                        help="keep tiles with at least this tissue fraction (default 0.5)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="encoder precision (auto: bf16 on CPUs with AVX512-BF16/AMX and on GPUs, else fp32)")
    parser.add_argument("--tissue-threshold", type=int, help="fixed saturation threshold 0-255 (default: per slide)")
    parser.add_argument("--tumour-classes", help="comma-separated QuPath class names that mark tumour regions")
    parser.add_argument("--tile-object", choices=("detection", "tile"), default="detection",
                        help="QuPath object type of tiles")
    parser.add_argument("--omit-tiles", action="store_true",
                        help="leave the tile objects out of the GeoJSON (region annotations only)")
    parser.add_argument("--min-focus", type=float,
                        help="leave out tiles whose focus score (variance of the Laplacian) is below this; 0 keeps "
                        "all (default 50)")
    parser.add_argument("--keep-artefacts", action="store_true",
                        help="also analyse tiles touching detected artefacts (pen ink, ...); by default they are left out")
    parser.add_argument("--save-embeddings", action="store_true",
                        help="also write tile embeddings (.features.h5 as CLAM / TRIDENT read them, and .npz)")
    parser.add_argument("--embeddings-format", choices=("h5", "npz", "both"), default=None,
                        help="with --save-embeddings: which file(s) to write (default: both)")


def _analysis_request(args: argparse.Namespace):
    """The ``AnalysisRequest`` the flags ask for (slide, MPP and regions only for ``analyze``: a cohort's come
    from its CSV, per slide). The regions file stays a path (``resolve_options(regions_path=...)``)."""
    from hepatoquant_client._generated.hepatoquant.v1 import hepatoquant_pb2 as pb

    request = pb.AnalysisRequest(
        model=args.model, segmenter_model=args.seg_model, tile_object_type=args.tile_object,
        omit_tiles=args.omit_tiles, include_embeddings=args.save_embeddings, keep_artefacts=args.keep_artefacts,
        precision=args.precision, embeddings_format=args.embeddings_format or "",
        tumour_class_names=[n.strip() for n in (args.tumour_classes or "").split(",") if n.strip()],
    )
    for field, value in (("tile_size_px", args.tile_size), ("tile_spacing_um_px", args.tile_spacing),
                         ("min_tissue_fraction", args.min_tissue_fraction), ("tissue_threshold", args.tissue_threshold),
                         ("window_overlap", args.window_overlap), ("min_focus", args.min_focus)):
        if value is not None:
            setattr(request, field, value)
    if args.command == "analyze":
        request.slide = str(args.slide)
        if args.mpp is not None:
            request.mpp_um_px = args.mpp
    return request


def _add_cohort_parser(commands) -> None:
    cohort = commands.add_parser("cohort", help="analyse many slides: on this machine or a Ray cluster")
    steps = cohort.add_subparsers(dest="cohort_command", required=True)
    run = steps.add_parser("run", help="every slide of a cohort CSV or folder, with resume and a failures table")
    run.add_argument("cohort", type=Path, help="CSV (slide[, slide_id, mpp, regions]) or a folder of slides")
    run.add_argument("--out", required=True,
                     help="output folder or fsspec URL (s3://..., with its driver installed): slides/<id>/, cohort.csv, "
                          "failures.csv")
    run.add_argument("--engine", choices=("local", "ray"), default="local")
    run.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: Ray on this machine")
    run.add_argument("--workers", type=int, default=1, help="slides analysed at once (one model copy each)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    _add_machine_flags(run)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--reader-workers", type=int, default=2, help="tile readers per slide")
    _add_request_flags(run)


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="HepatoBench: curate, split, extract, probe, compare encoders")
    steps = bench.add_subparsers(dest="bench_command", required=True)

    def step(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = steps.add_parser(name, help=help_text)
        sub.add_argument("dataset", type=Path, help="dataset folder: one subfolder per class, dataset_meta.json")
        sub.add_argument("--work", type=Path, default=Path("hepatobench-work"),
                         help="folder for this protocol's outputs (default: hepatobench-work)")
        return sub

    def encoders(sub: argparse.ArgumentParser, *, many: bool) -> None:
        sub.add_argument("--model", required=True, action="append" if many else "store",
                         help="encoder or classifier pack whose encoder is probed" + (" (repeatable)" if many else ""))
        sub.add_argument("--device", default="auto")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--workers", type=int, default=4, help="threads decoding patches")

    def probing(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--method", choices=("adamw", "lbfgs"), default="adamw", help="how the linear layer is fitted")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the test CIs")

    fetch = steps.add_parser("fetch", help="download HepatoBench from the Hugging Face Hub and lay it out for bench")
    fetch.add_argument("--to", type=Path, required=True, help="new (or empty) folder for the dataset")
    fetch.add_argument("--repo", default="xtxx/HepatoBench", help="the hub's dataset repository (default: %(default)s)")
    fetch.add_argument("--revision", help="branch, tag or commit (default: main)")
    fetch.add_argument("--partition", type=Path,
                       help="the official partition as relpath,label,split,group (the hub publishes none): checked "
                            "against the patches and written as split.csv")
    curate = step("curate", "find duplicates, near-duplicates, blurred, blank and off-colour patches")
    curate.add_argument("--config", type=Path, help="JSON of curation thresholds (default: the built-in ones)")
    curate.add_argument("--workers", type=int, default=4)
    split = step("split", "the train / val / test partition (official, or new by slide)")
    split.add_argument("--metadata", type=Path, help="CSV with relpath and slide (or --group-column) per patch")
    split.add_argument("--group-column", default="slide", help="metadata column to split by (slide or patient)")
    split.add_argument("--ratios", default="7:2:1", help="train:val:test in folds (default 7:2:1)")
    split.add_argument("--seed", type=int, default=0)
    extract = step("extract", "embeddings of every split with a pack's encoder (cached, resumable)")
    encoders(extract, many=False)
    probe = step("probe", "train a linear probe, score it on the test split, optionally save a classifier pack")
    encoders(probe, many=False)
    probing(probe)
    probe.add_argument("--save-pack", help="write the probe with its encoder as this classifier pack")
    probe.add_argument("--overwrite", action="store_true", help="replace an existing --save-pack")
    compare = step("compare", "extract, probe and score several encoders; write the leaderboard")
    encoders(compare, many=True)
    probing(compare)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from hepatoquant.errors import HepatoQuantError

    try:
        _check_inputs(args)  # paths, numbers and output folders, before torch, timm, peft or OpenSlide load
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "cohort":
            return _cohort_run(args)
        if args.command == "seg":
            return _seg_train(args) if args.seg_command == "train" else _seg_eval(args)
        if args.models_command == "list":
            return _models_list(args)
        if args.models_command == "import-head":
            return _models_import_head(args)
        if args.models_command == "import-pfmseg":
            return _models_import_pfmseg(args)
        return _models_add(args)
    except HepatoQuantError as exc:
        print(f"hepatoquant: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be checked without loading a model or opening a slide, in a fraction of a second: files that
    must exist, numbers that must be positive (0 is refused, not read as "the default"), output folders that
    must be writable (so that nothing is analysed only to fail when the results are written)."""
    from hepatoquant.errors import InvalidParameterError
    from hepatoquant.input_checks import (
        require_folder,
        require_input_file,
        require_positive,
        require_slide_file,
        require_writable_folder,
        validate_mpp,
    )

    if args.command == "analyze":
        require_slide_file(args.slide)
        if args.regions is not None:
            require_input_file(args.regions, what="--regions")
        if args.mpp is not None:
            validate_mpp(args.mpp, what="--mpp")
        require_positive(args.tile_size, what="--tile-size", integer=True)
        require_positive(args.tile_spacing, what="--tile-spacing")
        require_positive(args.batch_size, what="--batch-size", integer=True)
        require_positive(args.workers, what="--workers", integer=True)
        require_writable_folder(args.out, what="--out")
    elif args.command == "cohort":
        if not args.cohort.exists():
            raise InvalidParameterError(f"cohort {str(args.cohort)!r} does not exist; give a cohort CSV or a "
                                        "folder of slides")
        require_positive(args.tile_size, what="--tile-size", integer=True)
        require_positive(args.tile_spacing, what="--tile-spacing")
        require_positive(args.batch_size, what="--batch-size", integer=True)
        require_positive(args.workers, what="--workers", integer=True)
        require_positive(args.reader_workers, what="--reader-workers", integer=True)
        if "://" not in args.out:  # a local folder; fsspec URLs are checked by their driver when written
            require_writable_folder(args.out, what="--out")
    elif args.command == "demo":
        require_slide_file(args.slide)
        require_writable_folder(args.out, what="--out")
    elif args.command == "serve":
        for root in args.slide_root:
            require_folder(root, what="--slide-root")
        for option, path in (("--token-file", args.token_file), ("--tls-cert", args.tls_cert),
                             ("--tls-key", args.tls_key)):
            if path is not None:
                require_input_file(path, what=option)
    elif args.command == "models" and args.models_command == "add":
        if (args.checkpoint is None) == (args.from_hub is None):
            raise InvalidParameterError("give a checkpoint file or --from-hub REPO (one of them)")
        if args.checkpoint is not None:
            require_input_file(args.checkpoint, what="checkpoint")
            if args.encoder is None:
                raise InvalidParameterError("name the checkpoint's architecture with --encoder (uni, virchow2, ...)")
        if args.head is not None:
            require_input_file(args.head, what="--head")
    elif args.command == "models" and args.models_command == "import-head":
        require_input_file(args.head, what="head")
        require_input_file(args.encoder_weights, what="--encoder-weights")
    elif args.command == "models" and args.models_command == "import-pfmseg":
        require_input_file(args.checkpoint, what="--checkpoint")
        require_input_file(args.backbone_weights, what="--backbone-weights")
        require_positive(args.spacing_um_px, what="--spacing-um-px")
        require_positive(args.input_size, what="--input-size", integer=True)
    elif args.command == "seg" and args.seg_command == "train":
        require_input_file(args.config, what="config")
    elif args.command == "seg" and args.seg_command == "eval":
        for slide in args.slide:
            require_slide_file(slide)
        for path in [*args.annotations, *([args.pairs] if args.pairs else [])]:
            require_input_file(path, what="--annotations" if path != args.pairs else "--pairs")
        if args.mpp is not None:
            validate_mpp(args.mpp, what="--mpp")
        require_writable_folder(args.out, what="--out")
    elif args.command == "bench":
        if args.bench_command == "fetch":
            if args.partition is not None:
                require_input_file(args.partition, what="--partition")
        else:
            require_folder(args.dataset, what="dataset")
            require_writable_folder(args.work, what="--work")


def _analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hepatoquant.analysis import analyze_slide, demo_model_warning
    from hepatoquant.analysis_request import Runtime, resolve_options
    from hepatoquant.cli_display import composition_table, progress_bar
    from hepatoquant.pack_lookup import resolve_model_pack
    from hepatoquant.outputs import write_outputs
    from hepatoquant.run_clock import RunClock

    clock = RunClock.for_process()  # the report's timings add up to the wall time, start-up included
    console = Console(stderr=True)
    request = _analysis_request(args)
    with clock.stage("model_lookup"):
        pack = resolve_model_pack(request.model, args.models_dir)
        segmenter = (None if request.segmenter_model == "none"
                     else resolve_model_pack(request.segmenter_model, args.models_dir))
    shown_first = [demo_model_warning(p) for p in (pack, segmenter) if p is not None and p.is_untrained_demo]
    for warning in shown_first:
        console.print(f"[bold yellow]warning:[/] {warning}")
    runtime = Runtime(device=args.device, backend=args.backend, batch_size=args.batch_size, num_workers=args.workers,
                      readers=args.readers)
    options = resolve_options(request, pack, runtime, regions_path=args.regions)
    profiler = cProfile.Profile() if args.profile else None
    with progress_bar(console, disabled=args.no_progress) as on_progress, \
            profiler if profiler is not None else contextlib.nullcontext():
        result = analyze_slide(args.slide, pack, options, segmenter=segmenter, progress=on_progress, clock=clock)
        paths = write_outputs(result, args.out, include_tiles=not request.omit_tiles)
    if args.profile:
        clock.write_trace(args.profile)
        profiler.dump_stats(args.profile.with_suffix(".pstats"))
        console.print(f"Profile: {args.profile} (stages, Chrome trace) and {args.profile.with_suffix('.pstats')}")
    for warning in result.warnings:
        if warning not in shown_first:
            console.print(f"[yellow]warning:[/] {warning}")
    console.print(composition_table(result))
    console.print(f"Outputs in {args.out}/: {paths.geojson.name}, {paths.report.name}, {paths.cohort_csv.name}, "
                  f"{paths.overlay_png.name}, {paths.tissue_map.name}, {paths.region_mask.name} (+ .png previews)"
                  + "".join(f", {p.name}" for p in (paths.features_h5, paths.embeddings) if p is not None))
    console.print(f"[dim]{RESEARCH_USE_NOTICE}[/]")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hepatoquant.encoders import encoder_config, list_encoders
    from hepatoquant.errors import ModelPackError
    from hepatoquant.model_pack import default_models_dir, list_model_packs

    console = Console()
    models_dir = args.models_dir or default_models_dir()
    table = Table(title=f"Model packs in {models_dir}")
    for column in ("name", "kind", "encoder", "status", "classes"):
        table.add_column(column)
    broken = []
    for pack in list_model_packs(models_dir):
        if isinstance(pack, ModelPackError):
            broken.append(pack)
        else:  # --model looks packs up by folder name
            table.add_row(pack.path.name, pack.kind, pack.encoder_name, pack.model_status, " ".join(pack.classes))
    console.print(table)
    for error in broken:
        console.print(f"[red]broken pack:[/] {error}", soft_wrap=True)
    encoders = Table(title="Registered encoders")
    for column in ("name", "input px", "embedding", "description"):
        encoders.add_column(column)
    for name in list_encoders():
        config = encoder_config(name)
        encoders.add_row(name, str(config.input_size_px), str(config.embedding_dim), config.description)
    console.print(encoders)
    return 0


def _models_add(args: argparse.Namespace) -> int:
    from hepatoquant.errors import InvalidParameterError
    from hepatoquant.pack_import import add_model_pack

    if args.classes and args.head is None:
        raise InvalidParameterError("--classes names a head's outputs: give it with --head (an encoder-only pack "
                                    "has no classes)")
    extra = {"classes": _class_names(args.classes)} if args.classes else {}
    checkpoint, encoder = args.checkpoint, args.encoder
    if args.from_hub is not None:
        from hepatoquant.hub import download_encoder_weights, encoder_for_repository, hub_source

        encoder = encoder or encoder_for_repository(args.from_hub)
        filename = args.hub_file or (hub_source(encoder) or (None, None))[1]
        if filename is None:
            raise InvalidParameterError(f"encoder {encoder!r} names no file on the hub: give it with --hub-file")
        checkpoint = download_encoder_weights(args.from_hub, filename, revision=args.revision)
    pack = add_model_pack(
        checkpoint, encoder=encoder, name=args.name, models_dir=args.models_dir, head=args.head,
        overwrite=args.overwrite, **extra,
    )
    print(f"created {pack.kind} pack {pack.name!r} ({pack.model_status}) in {pack.path}")
    return 0


def _class_names(given: list[str]) -> tuple[str, ...]:
    """``--classes A B C`` or ``--classes A,B,C``."""
    return tuple(name for item in given for name in item.split(",") if name)


def _models_import_head(args: argparse.Namespace) -> int:
    from hepatoquant.pack_import import add_model_pack

    pack = add_model_pack(
        args.encoder_weights, encoder=args.encoder, name=args.name, models_dir=args.models_dir, head=args.head,
        classes=_class_names(args.classes), tile_size_px=args.tile_size_px, overwrite=args.overwrite,
    )
    print(f"created classifier pack {pack.name!r} ({len(pack.classes)} classes: {', '.join(pack.classes)}) in {pack.path}")
    return 0


def _models_import_pfmseg(args: argparse.Namespace) -> int:
    from hepatoquant.segmentation.pfmseg_import import import_pfmseg

    pack = import_pfmseg(
        args.checkpoint, backbone=args.backbone, backbone_weights=args.backbone_weights,
        classes=_class_names(args.classes), name=args.name, spacing_um_px=args.spacing_um_px,
        input_size_px=args.input_size, lora_scaling=args.lora_scaling, lora_alpha=args.lora_alpha,
        models_dir=args.models_dir, overwrite=args.overwrite,
    )
    source = pack.manifest["training"]["imported_from"]
    scale = f", LoRA rank {pack.manifest['lora']['rank']} scale {source['lora_scale']:g}" if pack.manifest.get("lora") else ""
    print(f"created segmenter pack {pack.name!r} ({source['finetune_mode']}{scale}; windows of "
          f"{pack.input_size_px} px at {pack.spacing_um_px:g} um/px) in {pack.path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hepatoquant.service.demo import run_demo

    console = Console(stderr=True)
    out = run_demo(args.slide, args.out, models_dir=args.models_dir, model=args.model, segmenter=args.seg_model,
                   console=console)
    console.print(f"Outputs in {out}/. [dim]{RESEARCH_USE_NOTICE}[/]")
    return 0


def _server_token(token_file: Path | None) -> str | None:
    """The token from ``--token-file`` (its text without the line end) or $HEPATOQUANT_TOKEN; None when neither
    is given. An empty or blank one is refused: it would switch authentication off by accident."""
    from hepatoquant.errors import InvalidParameterError

    if token_file is not None:
        token, source = token_file.read_text().strip(), f"token file {str(token_file)!r}"
    elif "HEPATOQUANT_TOKEN" in os.environ:
        token, source = os.environ["HEPATOQUANT_TOKEN"].strip(), "$HEPATOQUANT_TOKEN"
    else:
        return None
    if not token:
        raise InvalidParameterError(
            f"the {source} is empty: the server would run without authentication. Put a token in it (e.g. "
            "`openssl rand -hex 32 > token`), or leave out --token-file and unset $HEPATOQUANT_TOKEN to serve "
            "without one on purpose"
        )
    return token


def _server_config(args: argparse.Namespace):
    """`hepatoquant serve`'s options as the server's configuration (checked there: bad limits are refused)."""
    from hepatoquant.service.engine import ServerConfig

    return ServerConfig(
        slide_roots=tuple(r.resolve() for r in args.slide_root),
        state_dir=args.state_dir,
        models_dir=args.models_dir,
        default_model=args.model,
        default_segmenter=args.seg_model,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        readers=args.readers,
        workers=args.workers,
        max_queued_jobs=args.max_queued,
        max_results=args.max_results,
        max_tile_px=args.max_tile_px,
        rebuild_job_store=args.rebuild_job_store,
        token=_server_token(args.token_file),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_client=args.max_streams_per_client,
        max_message_bytes=args.max_message_mb * 2**20,
        rpc_threads=args.rpc_threads,
        http_max_connections=args.http_max_connections,
        http_idle_seconds=args.http_idle_seconds,
        handshake_seconds=args.handshake_seconds,
        min_free_bytes=args.min_free_mb * 2**20,
    )


def _serve(args: argparse.Namespace) -> int:
    from hepatoquant.errors import InvalidParameterError
    from hepatoquant.service.server import serve_until_signalled, start_server

    from hepatoquant.service import logs

    logs.configure(args.log_format)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidParameterError("give both --tls-cert and --tls-key, or neither")
    config = _server_config(args)
    tls = (str(args.tls_cert), str(args.tls_key)) if args.tls_cert else None
    running = start_server(config, host=args.host, grpc_port=args.port, http_host=args.http_host,
                           http_port=args.http_port, tls=tls)
    print(f"hepatoquant serving: gRPC port {running.grpc_port}, HTTP/JSON port {running.http_port}", flush=True)
    serve_until_signalled(running)
    return 0


def _seg_train(args: argparse.Namespace) -> int:
    from hepatoquant.segmentation.train import load_training_config, train_segmenter

    result = train_segmenter(load_training_config(args.config), resume=args.resume)
    print(f"best validation mean Dice {result.best_val_dice:.4f}; segmenter pack: {result.pack.path}")
    return 0


def _seg_eval(args: argparse.Namespace) -> int:
    from hepatoquant.classify import choose_device
    from hepatoquant.errors import InvalidParameterError
    from hepatoquant.pack_lookup import resolve_model_pack
    from hepatoquant.segmentation.evaluate import write_evaluation
    from hepatoquant.segmentation.evaluation_runs import evaluate_on_pairs, evaluate_on_slides
    from hepatoquant.segmentation.metrics import scores_markdown
    from hepatoquant.segmentation.pack import load_segmenter

    if bool(args.pairs) == bool(args.slide):
        raise InvalidParameterError("give either --pairs DATASET.json or --slide/--annotations, not both or neither")
    if len(args.slide) != len(args.annotations):
        raise InvalidParameterError(
            f"{len(args.slide)} --slide but {len(args.annotations)} --annotations: give one annotations file per slide"
        )
    pack = resolve_model_pack(args.model, args.models_dir)
    device = choose_device(args.device)
    model = load_segmenter(pack, device)
    if args.pairs:
        scores = evaluate_on_pairs(model, args.pairs, args.split, device)
        stem = f"seg-eval-{pack.name}-{args.pairs.stem}-{args.split}"
    else:
        slides = [(s, a, args.mpp) for s, a in zip(args.slide, args.annotations)]
        scores = evaluate_on_slides(model, pack, slides, rest_of_tissue=args.rest_of_tissue, device=device)
        stem = f"seg-eval-{pack.name}-slides"
    json_path, md_path = write_evaluation(scores, args.out, stem)
    print(scores_markdown(scores))
    print(f"written: {json_path}, {md_path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "fetch":
        from hepatoquant.bench.fetch import fetch_hepatobench

        outcome = fetch_hepatobench(args.to, repository=args.repo, revision=args.revision, partition=args.partition)
        print(f"{sum(outcome.patches.values())} patches in {outcome.root}/ (commit {outcome.revision}, "
              f"{len(outcome.skipped)} left out); "
              + ("split.csv written from --partition" if outcome.partition else
                 "no partition: the hub publishes none; give --partition, or `bench split --metadata` with slides"))
        return 0
    from hepatoquant.bench import protocol

    work: Path = args.work
    if args.bench_command == "curate":
        protocol.run_curate(args.dataset, work, config_path=args.config, workers=args.workers)
        return 0
    if args.bench_command == "split":
        from hepatoquant.bench.split import parse_ratios

        protocol.run_split(args.dataset, work, metadata=args.metadata, group_column=args.group_column,
                           ratios=parse_ratios(args.ratios), seed=args.seed)
        return 0
    from hepatoquant.bench.probe import ProbeConfig
    from hepatoquant.classify import choose_device
    from hepatoquant.pack_lookup import resolve_model_pack

    from rich.progress import Progress

    device = choose_device(args.device)
    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress_for(label: str):
            def update(done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(f"embedding {label}", total=total)
                bar.update(tasks[label], completed=done)
            return update

        common = {"device": device, "batch_size": args.batch_size, "workers": args.workers,
                  "progress_for": progress_for, "log": bar.console.print}
        if args.bench_command == "extract":
            protocol.run_extract(args.dataset, work, resolve_model_pack(args.model, args.models_dir), **common)
            return 0
        config = ProbeConfig(method=args.method, seed=args.seed)
        if args.bench_command == "probe":
            protocol.run_probe(args.dataset, work, resolve_model_pack(args.model, args.models_dir), config=config,
                               bootstrap=args.bootstrap, save_pack=args.save_pack, models_dir=args.models_dir,
                               overwrite=args.overwrite, **common)
            return 0
        packs = [resolve_model_pack(name, args.models_dir) for name in args.model]
        protocol.run_compare(args.dataset, work, packs, config=config, bootstrap=args.bootstrap, **common)
    return 0


EXIT_SOME_SLIDES_FAILED = 3


def _cohort_run(args: argparse.Namespace) -> int:
    """Exit 0 when every slide has complete outputs, 3 when some failed (see failures.csv), 2 on bad input."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hepatoquant.cohort.engines import run_cohort
    from hepatoquant.cohort.inputs import read_cohort
    from hepatoquant.analysis_request import Runtime
    from hepatoquant.cohort.runner import CohortSettings, write_tables
    from hepatoquant.model_pack import ensure_demo_pack
    from hepatoquant.pack_lookup import resolve_model_pack

    items = read_cohort(args.cohort)
    request = _analysis_request(args)
    if request.model == "demo":
        ensure_demo_pack(args.models_dir)  # made once here, not by every worker at the same time
    resolve_model_pack(request.model, args.models_dir)  # a wrong pack name fails before anything runs
    if request.segmenter_model != "none":
        resolve_model_pack(request.segmenter_model, args.models_dir)
    settings = CohortSettings(
        request=request, models_dir=str(args.models_dir) if args.models_dir else None,
        runtime=Runtime(device=args.device, backend=args.backend, batch_size=args.batch_size,
                        num_workers=args.reader_workers, readers=args.readers),
    )
    console = Console(stderr=True)
    counts = {"done": 0, "failed": 0, "skipped": 0, "tiles": 0}
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("slides", total=len(items))

        def on_outcome(outcome) -> None:
            key = "skipped" if outcome.skipped else "done" if outcome.ok else "failed"
            counts[key] += 1
            counts["tiles"] += outcome.tiles
            if not outcome.ok:
                bar.console.print(f"[red]failed[/] {outcome.slide_id}: {outcome.error}")
            rate = counts["tiles"] / max(time.perf_counter() - started, 1e-9)
            remaining = len(items) - counts["done"] - counts["failed"] - counts["skipped"]
            bar.update(task, advance=1, description=f"done {counts['done']}, failed {counts['failed']}, skipped "
                                                    f"{counts['skipped']}, remaining {remaining}, {rate:.1f} tiles/s")

        outcomes = run_cohort(items, settings, args.out, engine=args.engine, workers=args.workers,
                              address=args.address, on_outcome=on_outcome)
    tables = write_tables(items, outcomes, args.out)
    elapsed = time.perf_counter() - started
    console.print(f"{len(items)} slides: {counts['done']} analysed, {counts['skipped']} already complete, "
                  f"{counts['failed']} failed, in {elapsed:.1f} s ({args.engine} engine, {args.workers} worker(s)); "
                  f"cohort table {tables.get('cohort', 'not written (no slide completed)')}, failures {tables['failures']}")
    return EXIT_SOME_SLIDES_FAILED if counts["failed"] else 0


def entry() -> None:
    """The ``hepatoquant`` command (and ``python -m hepatoquant.cli``): :func:`main`, then the process's exit.

    Exiting, the interpreter's garbage collector walks every object once more: 0.9 s with torch and timm loaded
    (measured), after the work is done and a third of a small slide's run. Frozen (``gc.freeze``), they are
    skipped: 0.15 s; atexit handlers still run. Only here: in-process callers of ``main`` keep their collector.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
