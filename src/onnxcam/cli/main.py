"""Command line: `onnxcam explain`, `layers`, `ops`, `export`, `serve`, `evaluate`, `providers`.

Every user-facing failure is an OnnxcamError printed as one line with exit status 2; nothing the user
gave (model, images) is ever written to. `explain` streams folders and globs (cli/dataset.py): a file it cannot
read is skipped with one line, and the run then ends with status 1.
"""
from __future__ import annotations

import json
import re
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from ..cam import methods
from ..cam import targets as target_kinds
from . import dataset, inputs
from ..images import preprocess, render
from ..errors import OnnxcamError, first_line
from ..images.labels import match_label
from ..cam.methods import exportable_methods
from ..model.safeio import regular_file

EXIT_USAGE = 2
# Overlays' longest side: images named one by one, folders and globs (where blending and encoding photo-sized
# overlays would take most of the run), a panel's tiles.
OVERLAY_SIDE, DATASET_SIDE, PANEL_SIDE = 2048, 800, 1024


def _fail(message: str) -> None:
    raise OnnxcamError(message)


def _parse_floats(text: str | None, name: str):
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise OnnxcamError(f"--{name} takes numbers separated by commas, got '{text}'") from None
    if not values:
        raise OnnxcamError(f"--{name} is empty")
    return values


def _parse_size(text: str | None):
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        nums = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise OnnxcamError(f"--size takes N or HxW, got '{text}'") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise OnnxcamError(f"--size takes N or HxW with positive numbers, got '{text}'")
    return tuple(nums)


def _resolve_target(text: str | None, labels: list[str] | None, num_classes: int | None):
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = match_label(text, labels, "--target")
    if num_classes is not None and not 0 <= value < num_classes:
        raise OnnxcamError(f"--target {value} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    if value < 0:
        raise OnnxcamError(f"--target {value} is out of range")
    return value


def _tensor_inputs(paths: list[str], explainer) -> bool:
    """True when the inputs are .npy tensors: always for 1-D signals and 3-D volumes (no image format holds
    them), optionally for 2-D models (an already preprocessed tensor)."""
    npy = [p.lower().endswith(".npy") for p in paths]
    if any(npy) and not all(npy):
        _fail("give either images or .npy tensors, not both")
    if not all(npy) and explainer.image_rank != 4:
        _fail(f"input '{explainer.image_input}' has rank {explainer.image_rank}, not an image: give each sample "
              f"as a .npy file")
    return all(npy)


def _load_sample(path: str, explainer) -> np.ndarray:
    """One sample from a .npy file, with the batch axis: shaped like the model input without it, or with a
    batch of 1. Shape and dtype are checked against the model by Explainer.explain."""
    regular_file(path, "input", 4 * 2 ** 30)  # a FIFO would block np.load forever
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OnnxcamError(f"cannot read {path} as a .npy array: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    rank = explainer.image_rank or arr.ndim
    if arr.ndim == rank - 1:
        arr = arr[None]
    if arr.ndim != rank or arr.shape[0] != 1:
        raise OnnxcamError(f"{path} has shape {arr.shape}; input '{explainer.image_input}' takes one sample of "
                           f"rank {rank - 1} (or {rank} with a batch of 1)")
    if arr.dtype.kind not in "fiub":
        raise OnnxcamError(f"{path} holds {arr.dtype} values; the model input is numeric")
    return arr


def _overlay_paths(items, out: str | None, tag: str, fmt: str | None) -> tuple[list[Path], Path | None]:
    """Where each item's picture goes: OUT itself when it names an image file and one file was given, else
    OUT/<the item's path below its folder argument>_<tag>.<format> (files given directly: OUT/<stem>_<tag>).
    Only checks; returns the paths and the folder still to create. Nothing is created here: a run that fails before
    its first image leaves no empty folder behind."""
    suffix_of_out = Path(out).suffix.lower() if out is not None else ""
    single = bool(suffix_of_out) and not Path(out).is_dir()
    if single:
        if suffix_of_out not in render.IMAGE_FORMATS:
            raise OnnxcamError(f"-o {out}: '{suffix_of_out}' is not an image format onnxcam writes (use "
                               f"{', '.join(render.IMAGE_FORMATS)}), nor an existing folder")
        if len(items) > 1:
            raise OnnxcamError(f"-o {out} names one file but {len(items)} images were given; give a folder")
        if not items[0].direct:
            raise OnnxcamError(f"-o {out} names one file but a folder or glob was given; give a folder")
        if fmt is not None and render.IMAGE_FORMATS[suffix_of_out] != render.IMAGE_FORMATS["." + fmt]:
            raise OnnxcamError(f"-o {out} and --format {fmt} disagree; the file's extension sets its format")
        paths, to_create = [Path(out)], None
    else:
        folder = Path(out) if out is not None else Path("onnxcam-out")
        if folder.exists() and not folder.is_dir():
            raise OnnxcamError(f"output {folder} exists and is not a directory")
        to_create = None if folder.exists() else folder
        ext = "." + (fmt or "png")
        paths = [folder / f"{item.stem}_{tag}{ext}" for item in items]
    inputs = {os.path.realpath(item.path) for item in items}
    for p in paths:
        if os.path.realpath(p) in inputs:
            raise OnnxcamError(f"output {p} would overwrite an input image")
    parent = to_create if to_create is not None else (paths[0].parent if str(paths[0].parent) else Path("."))
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if to_create is None and existing != parent:
        raise OnnxcamError(f"cannot write {paths[0]}: directory {parent} does not exist")
    if not existing.is_dir():
        raise OnnxcamError(f"cannot write {paths[0]}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise OnnxcamError(f"cannot write {paths[0]}: permission denied")
    return paths, to_create


def _preprocessing_options(f):
    """How images become the model's input, where the model's metadata does not say (explain, serve, metadata)."""
    options = [
        click.option("--preset", type=click.Choice(sorted(preprocess.PRESETS)), help="Input normalisation preset."),
        click.option("--mean", help="Per-channel mean on the preset's scale, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--size", help="Input size N or HxW (needed when the model's size is dynamic)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False), help="Input layout."),
        click.option("--labels", "labels_file", type=click.Path(), help="Class names: one per line, or a JSON list."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _preprocessing_overrides(preset, mean, std, size, layout) -> dict:
    """The preprocessing flags that were given, parsed."""
    given = dict(preset=preset, mean=_parse_floats(mean, "mean"), std=_parse_floats(std, "std"),
                 size=_parse_size(size), layout=layout.upper() if layout else None)
    return {k: v for k, v in given.items() if v is not None}


def _precision_options(f):
    """--precision and --calibration (explain, serve): onnxcam.run.precision."""
    f = click.option("--calibration", "calibration", multiple=True, type=click.Path(exists=True),
                     help="Images (files or folders) to calibrate --precision int8 on; repeatable.")(f)
    return click.option(
        "--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "auto"], case_sensitive=False),
        help="Arithmetic of the model's forward (docs/precision.md): bf16/fp16 run the part before the layer "
             "on OpenVINO (pip install 'onnxcam[openvino]'), int8 quantizes it (needs --calibration); the "
             "gradient and CAM stay float32. auto: what this CPU has units for. [default: fp32]")(f)


def _precision_choice(precision: str | None, calibration) -> tuple[str | None, list | None]:
    """(precision, calibration image paths) from the options, refusing calibration without int8/auto."""
    if calibration and (precision or "").lower() not in ("int8", "auto"):
        _fail("--calibration calibrates --precision int8 (or auto); give it with one of those")
    images = [item.path for item in dataset.make_items(
        dataset.collect(list(calibration), dataset.IMAGE_SUFFIXES, []))] if calibration else None
    return (precision.lower() if precision else None), images


def _device_option(f):
    return click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"], case_sensitive=False),
                        default="cpu", show_default=True,
                        help="Execution provider: auto = CUDA when onnxruntime-gpu offers it, else the CPU.")(f)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxcam")
def cli() -> None:
    """Grad-CAM visual explanations for any ONNX model."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", metavar="PATH...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", help="Output image (one image) or directory [default: onnxcam-out/]; "
                                            "a folder's tree is mirrored below it.")
@click.option("--layer", "layers", multiple=True,
              help="ONNX tensor to explain (default: the last spatial feature map; see `onnxcam layers`). "
                   "Repeat, or separate with commas, to average several layers.")
@click.option("--target", "target", multiple=True,
              help="Class index or label to explain (default: the top-scoring class), or an index tuple into one "
                   "sample's output, e.g. 0,3,5 (see docs/targets.md). Repeat for several classes per image, "
                   "one map each, from one forward (--target 3 --target cat).")
@click.option("--finer", is_flag=True,
              help="Finer-CAM: the target class (default: the top one) against the 3 classes whose scores are "
                   "closest to it -- what sets it apart from what it is most easily taken for.")
@click.option("--rest", is_flag=True,
              help="ReST (ShapleyCAM's target): the class logit plus its log-probability, y = z_c + log p_c.")
@click.option("--top-k-maps", "top_k_maps", type=click.IntRange(1, None),
              help="One map for each of the K highest-scoring classes of every image, from one forward.")
@click.option("--region", help="Segmentation: CLASS[:MASK.png], class CLASS's logits summed over the mask (nonzero "
                               "pixels, resized to the output grid) or, without a mask, over CLASS's predicted mask.")
@click.option("--box", type=int, help="Detection (N, boxes, 5+classes output): explain box I; see --field.")
@click.option("--field", help="With --box: objectness (default), class (the box's top class) or class:C.")
@click.option("--input", "extra_inputs", multiple=True,
              help="NAME=FILE.npy: a value for another input of a multi-input model (repeatable); the image is "
                   "the explained input.")
@click.option("--method", default="gradcam", show_default=True, help=f"One of: {', '.join(methods.METHODS)}.")
@click.option("--counterfactual", is_flag=True, help="Negated gradients: regions that argue against the class.")
@click.option("--aug-smooth", is_flag=True, help="Average over horizontal flips x intensity factors 0.9/1/1.1.")
@click.option("--eigen-smooth", is_flag=True, help="First principal component instead of the channel sum.")
@click.option("--output-name", "output_name", help="Model output to explain (default: the first).")
@_preprocessing_options
@click.option("--panel", is_flag=True,
              help="Write the Grad-CAM paper's Figure 1 row: original | Grad-CAM | Guided Backprop | "
                   "Guided Grad-CAM | counterfactual.")
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Heatmap opacity.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, None), help="Classes to print.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, None),
              help="Images per onnxruntime run; also the perturbed inputs per run of Score-CAM, Ablation-CAM, "
                   "ReciproCAM and RISE.")
@click.option("--rise-masks", type=click.IntRange(1, None),
              help="--method rise: random masks per image [default: 4000, the paper's].")
@click.option("--rise-cells", type=click.IntRange(1, None), help="--method rise: grid cells per side [default: 7].")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"], case_sensitive=False),
              help="Format of the overlays written into a folder [default: png; -o FILE: its extension].")
@click.option("--max-overlay-side", type=click.IntRange(1, None),
              help=f"Longest side of the overlays, in pixels [default: {OVERLAY_SIDE} for images named one by one, "
                   f"{DATASET_SIDE} for folders and globs].")
@click.option("--no-overlay", is_flag=True, help="Write no pictures (with --save-maps, --results or --json).")
@click.option("--save-maps", "save_maps", help="Keep the maps: a .npz file (keys: each image's path below its "
                                               "folder argument) or a folder of .npy files.")
@click.option("--maps-size", type=click.Choice(["layer", "input"]), default="layer", show_default=True,
              help="The raw map at the layer's resolution, or the [0, 1] heatmap at the model input's.")
@click.option("--maps-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Type of the saved maps.")
@click.option("--results", "results_file", help="Write one row per image (path, target, label, score, "
                                                 "probability, layer, method) to this .csv or .jsonl file.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON lines: one object per image.")
@click.option("--batch-axis", "batch_axis", type=int, default=None,
              help="Axis of the explained output that holds the samples (default: found from the graph; "
                   "e.g. 1 for (T, N, K) CTC logits).")
@_precision_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on a Ray cluster (onnxcam.ray: read -> map_batches -> write_parquet): -o is the folder of "
                   "Parquet files, one row per image (path, target, label, score, probability, heatmap). Without "
                   "ADDRESS a local Ray instance; 'auto' or ray://HOST:PORT joins a cluster.")
@_device_option
@click.pass_context
def explain(ctx, model, images, out, layers, target, method, counterfactual, aug_smooth, eigen_smooth, output_name,
            preset, mean, std, size, layout, labels_file, panel, alpha, top, batch_size, fmt, max_overlay_side,
            no_overlay, save_maps, maps_size, maps_dtype, results_file, as_json, batch_axis, device,
            region=None, box=None, field=None, extra_inputs=(), top_k_maps=None, ray_address=None, precision=None,
            calibration=(), finer=False, rise_masks=None, rise_cells=None, rest=False):
    """Write a CAM overlay for each image and print the top classes. PATH is an image (or .npy tensor), a
    folder (searched recursively) or a quoted glob such as 'data/**/*.jpg'; images stream through in batches.
    An unreadable file is skipped with one line, and the run ends with exit status 1."""
    from ..cam.export import guard_outputs, model_files
    from ..run.explainer import Explainer

    info = methods.get_method(method)
    method = info.name
    several = list(target) if len(target) > 1 else None  # several classes per image: one map each
    target = target[0] if len(target) == 1 else None
    if several is not None and any("," in t and t.replace(",", "").replace("-", "").strip().isdigit()
                                   for t in several):
        _fail("several --target take class indices or labels, not index tuples")
    if top_k_maps is not None and (several is not None or target is not None):
        _fail("--top-k-maps and --target cannot be combined: give the classes, or let the top K be chosen")
    multi = several is not None or top_k_maps is not None
    if finer and rest:
        _fail("--finer and --rest are two targets; give one")
    if finer or rest:
        flag_name = "--finer" if finer else "--rest"
        for flag, given in (("--region", region), ("--box", box), ("--top-k-maps", top_k_maps),
                            ("several --target", several)):
            if given:
                _fail(f"{flag_name} explains one class of a classifier; {flag} goes without it")
        if target is not None and "," in target:
            _fail(f"{flag_name} takes a class index or label as --target, not an index tuple")
    if multi:
        for flag, given in (("--region", region), ("--box", box), ("--panel", panel)):
            if given:
                _fail(f"{flag} explains one target per image; several classes per image (--top-k-maps, repeated "
                      f"--target) go without it")
    if ray_address is not None:
        return _explain_on_ray(model, images, out, ray_address, layer=_layer_names(layers), method=method,
                               target=target, batch_size=batch_size, device=device, output=output_name,
                               overrides=_preprocessing_overrides(preset, mean, std, size, layout),
                               unsupported={"--region": region, "--box": box, "--input": extra_inputs,
                                            "--panel": panel, "--counterfactual": counterfactual,
                                            "--aug-smooth": aug_smooth, "--eigen-smooth": eigen_smooth,
                                            "--save-maps": save_maps, "--results": results_file,
                                            "--json": as_json, "--labels": labels_file, "--batch-axis": batch_axis,
                                            "--top-k-maps": top_k_maps, "several --target": several,
                                            "--finer": finer, "--rest": rest, "--rise-masks": rise_masks,
                                            "--rise-cells": rise_cells, "--no-overlay": no_overlay, "--format": fmt,
                                            "--precision": precision, "--calibration": calibration,
                                            "--max-overlay-side": max_overlay_side})
    if panel and method not in ("gradcam", "guided-gradcam", "guided-backprop"):
        _fail("--panel shows Grad-CAM with Guided Backprop (the paper's Figure 1); use it with --method gradcam")
    if counterfactual and not info.uses_gradients:
        _fail(f"--counterfactual needs gradients; method '{method}' uses none")
    fmt = fmt.lower().replace("jpeg", "jpg") if fmt else None
    if no_overlay:
        for flag, given in (("--panel", panel), ("-o", out), ("--format", fmt), ("--max-overlay-side", max_overlay_side)):
            if given:
                _fail(f"{flag} is about the pictures, and --no-overlay writes none")
    dataset.check_arguments(images)
    overrides = _preprocessing_overrides(preset, mean, std, size, layout)
    tag = "panel" if panel else ("counterfactual" if counterfactual else method.replace("+", "p"))
    if save_maps:
        dataset.check_save_maps(save_maps)
    if results_file:
        dataset.check_results(results_file)
    # The run's own output folders are never read as input (a second run over the same tree).
    own_folders = [f for f in ((out if out is not None else "onnxcam-out") if not no_overlay else None,
                               save_maps if save_maps and Path(save_maps).suffix.lower() != ".npz" else None) if f]
    every_kind = dataset.IMAGE_SUFFIXES + (dataset.TENSOR_SUFFIX,)
    items = dataset.make_items(dataset.collect(images, every_kind, own_folders))
    read = [*model_files(model), *([labels_file] if labels_file else []),
            *(e.split("=", 1)[1] for e in extra_inputs if "=" in e),
            *([region.split(":", 1)[1]] if region and ":" in region else [])]

    files_out = [*([save_maps] if save_maps else []), *([results_file] if results_file else [])]

    def plan(items):
        paths, to_create = _overlay_paths(items, out, tag, fmt) if not no_overlay else ([], None)
        inputs_seen = {os.path.realpath(item.path) for item in items}
        for f in files_out:
            if os.path.realpath(f) in inputs_seen:
                raise OnnxcamError(f"output {f} would overwrite an input image")
        guard_outputs([*paths, *files_out], read)  # the model's files; the images were checked above
        return paths, to_create

    _, to_create = plan(items)  # before the model loads: a wrong -o is one line at once
    precision, calibration_images = _precision_choice(precision, calibration)
    explainer = Explainer(model, layer=_layer_names(layers), method="guided-gradcam" if panel else method,
                          output=output_name, batch_size=batch_size, device=device, batch_axis=batch_axis,
                          precision=precision, calibration=calibration_images,
                          rise=_rise_options(method, rise_masks, rise_cells))
    if precision:  # what ran, and why (auto reads the CPU's flags)
        click.echo(f"onnxcam: precision: {explainer.precision.reason}", err=True)
    model_outputs = [o.name for o in explainer.source_model.graph.output]
    if to_create is not None and out is not None and out in model_outputs:
        # The issue tracker and other tools say "--output NAME" for the model output; here -o is the PNG path.
        _fail(f"'{out}' is an output of the model; -o/--output is where the PNGs go. To explain that output "
              f"use --output-name {out}")
    labels = preprocess.labels_from_file(labels_file) if labels_file else explainer.labels
    k = explainer.num_classes
    # A segmentation model's labels name its class axis, not every element of the flattened score.
    if labels is not None and k is not None and len(labels) != k and region is None:
        _fail(f"{len(labels)} labels given for a score with {k} classes")
    given = [flag for flag, value in (("--target", target), ("--region", region), ("--box", box)) if value is not None]
    if len(given) > 1:
        _fail(f"{' and '.join(given)} cannot be combined: give one target")
    if field is not None and box is None:
        _fail("--field goes with --box")
    if region is not None:  # targets beyond a class index: onnxcam/targets.py
        target_index = inputs.parse_region(region, labels)
    elif box is not None:
        target_index = inputs.parse_box(box, field)
    elif target is not None and "," in target and target.replace(",", "").replace("-", "").strip().isdigit():
        target_index = inputs.parse_index(target)
    elif target is None and explainer.is_detector:
        # A detector with no target given: its top detection's class score (the box is drawn on the overlay).
        target_index = target_kinds.DetectionTarget(None, "class")
    else:
        target_index = _resolve_target(target, labels, k)
    if finer or rest:
        if explainer.sample_shape is None or len(explainer.sample_shape) != 1 or explainer.is_detector:
            _fail(f"{'--finer' if finer else '--rest'} needs a classifier's (N, classes) score")
        target_index = target_kinds.FinerTarget(target_index) if finer else target_kinds.ReSTTarget(target_index)
    if multi:
        if explainer.sample_shape is None or len(explainer.sample_shape) != 1 or explainer.is_detector:
            _fail("several classes per image need a classifier's (N, classes) score")
        if top_k_maps is not None and k is not None and top_k_maps > k:
            _fail(f"--top-k-maps {top_k_maps}: the model has {k} classes")
        target_index = target_kinds.top_classes(top_k_maps) if top_k_maps is not None else \
            [[_resolve_target(t, labels, k) for t in several]]
    other_inputs = inputs.load_inputs(extra_inputs, explainer)

    # Folders and globs hold what the model reads: images for an image model, .npy tensors for signals and
    # volumes, or for an image model given its tensors directly.
    direct = [item.path for item in items if item.direct]
    tensors_only = explainer.image_rank != 4 or (direct and all(p.lower().endswith(".npy") for p in direct))
    kind = (dataset.TENSOR_SUFFIX,) if tensors_only else dataset.IMAGE_SUFFIXES
    if any(not item.direct for item in items):
        items = dataset.make_items(dataset.collect(images, kind, own_folders))
    as_arrays = _tensor_inputs([item.path for item in items], explainer)
    if as_arrays and panel:
        _fail("--panel shows 2-D images; this input is given as .npy tensors")
    paths, _ = plan(items)
    for name, arr in other_inputs.items():
        if arr.shape[0] not in (1, len(items)):
            _fail(f"--input {name} holds {arr.shape[0]} samples for {len(items)} image(s); give 1 or one per image")
    pp = None if as_arrays else explainer.preprocessing(**overrides)
    assumed = None  # said once the first batch has run: a failed run prints its one error line only
    if pp is not None and pp.source == "default":  # a plausible map from the wrong normalisation would pass unnoticed
        assumed = (f"onnxcam: note: {model} carries no preprocessing metadata; normalising as ImageNet "
                   f"(mean {_fmt_floats(pp.mean)}, std {_fmt_floats(pp.std)} on 0..1 RGB). Pass --preset or "
                   f"--mean/--std, or store it in the model with `onnxcam metadata`")
    # The overlay is a picture of a map: blending a 6000x4000 photo at full size cost 12.8 s and 1.9 GB for no
    # visible gain, and across a folder the PNG encoding of full-size overlays would take most of the run. A
    # panel's five tiles get 1024 px each.
    side = max_overlay_side or (OVERLAY_SIDE if all(item.direct for item in items) else DATASET_SIDE)
    side = min(side, PANEL_SIDE) if panel else side
    draw = not no_overlay
    opts = dict(aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    one_batch = len(items) <= batch_size
    options = "".join(f" ({name})" for name, on in (("counterfactual", counterfactual and not panel),
                                                     ("aug-smooth", aug_smooth), ("eigen-smooth", eigen_smooth)) if on)
    describe = (lambda i: target_kinds.describe(i) if isinstance(i, target_kinds.Target)
                else labels[i] if labels is not None and i < len(labels) else str(i))
    folders = dataset.Folders()
    maps_out = dataset.MapsWriter(save_maps, maps_dtype, folders) if save_maps else None
    results_out = dataset.ResultsWriter(results_file) if results_file else None
    progress = dataset.Progress(len(items), show=not one_batch)
    state = {"explained": 0, "skipped": 0, "said": False}

    def load(item):
        """Decode and preprocess one file (a pool thread); the full-size photo is dropped here, only the
        picture the overlay needs is kept."""
        if as_arrays:
            tensor = _load_sample(item.path, explainer)
            return tensor, (render.tensor_image(tensor[0], explainer.layout) if draw and tensor.ndim == 4 else None)
        photo = preprocess.load_image(item.path)
        tensor = preprocess.to_tensor(photo, pp)
        if not draw:
            return tensor, None
        factor = max(photo.size) // side
        if factor >= 2:  # a box reduction first: 5x cheaper than the bilinear filter over the whole photo
            photo = photo.reduce(factor)
        return tensor, render.fit(photo, side)

    def skip(item, exc):
        state["skipped"] += 1
        click.echo(f"onnxcam: skipped {item.path}: {dataset.skip_reason(item.path, exc)}", err=True)
        progress.update(1)

    def run(tensors, rows, cf):
        values = {n: (a if a.shape[0] == 1 else a[rows]) for n, a in other_inputs.items()}
        feeds = inputs.batch_feeds(explainer, np.concatenate(tensors), values)
        total = explainer.perturbation_count(len(tensors)) * (6 if aug_smooth else 1) if one_batch else 0
        if total:
            with click.progressbar(length=total, label=f"{method}: perturbed forward passes",
                                   file=sys.stderr) as bar:
                return explainer.explain(feeds, target_index, counterfactual=cf, progress=bar.update, **opts)
        # (a one-sample graph is run sample by sample by the Explainer)
        return explainer.explain(feeds, target_index, counterfactual=cf, **opts)

    def run_group(group):
        tensors, rows = [t for _, t, _ in group], [item.index for item, _, _ in group]
        result = run(tensors, rows, counterfactual and not panel)
        contrary = run(tensors, rows, True) if panel else None
        state["explained"] += len(group)
        return [(entry, result, contrary, j) for j, entry in enumerate(group)]

    def explain_group(group):
        """[(item, tensor, picture)] of one tensor shape -> [(the same, result, contrary result, row)]. A failing
        batch is retried image by image, so that one bad sample (a NaN in a .npy) is skipped alone; when every
        image fails before any has succeeded, the failure is the run's (the model, the target), not an image's."""
        try:
            return run_group(group)
        except OnnxcamError as exc:
            if len(items) == 1:
                raise
            failure = exc
        done, errors = [], []
        for entry in group if len(group) > 1 else ():
            try:
                done.extend(run_group([entry]))
            except OnnxcamError as exc:
                errors.append((entry, exc))
        if len(group) == 1:
            errors = [(group[0], failure)]
        if not done and not state["explained"]:
            raise errors[0][1]
        for entry, exc in errors:
            skip(entry[0], exc)
        return done

    def record(item, path, result, j):
        """What the run says about one image (one target): stdout, --json, --results."""
        t = result.targets[j] if result.target_scores is not None else int(result.targets[j])
        scores = result.scores[j]
        probs = _softmax(scores.astype(np.float64))
        order = np.argsort(-scores)[:top] if scores.ndim == 1 else []  # a class list only for (N, K) scores
        classic = result.target_scores is None and scores.ndim == 1
        rec = {
            "image": item.path, "name": item.name, "output": str(path) if path is not None else None,
            "layers": list(explainer.layers), "method": method, "counterfactual": counterfactual,
            "target": describe(t) if result.target_scores is not None else t, "target_label": describe(t),
            # the differentiated scalar y = <W, score> of a target object
            "target_score": float(result.target_scores[j]) if result.target_scores is not None else None,
            "score": float(result.target_scores[j]) if result.target_scores is not None else
            (float(scores[t]) if classic else None),
            "probability": float(probs[t]) if classic else None,
            "provider": explainer.provider,
            "top": [{"class": int(c), "label": describe(int(c)), "score": float(scores[c]),
                     "probability": float(probs[c])} for c in order],
            "warnings": [re.sub(r"^sample \d+ ", "", w) for w in result.warnings if re.match(rf"sample {j}\b", w)],
            "note": None,
            "k": 0,  # which of the image's targets (several classes per image: one record each)
        }
        if (isinstance(t, target_kinds.RegionTarget) and t.mask is None and scores.ndim >= 2
                and not (scores.argmax(0) == t.cls).any()):
            rec["note"] = f"class {t.cls} owns no pixel of the predicted mask: the region and its map are empty"
        return rec, t

    def picture_job(item, path, tensor, picture, result, contrary, j, t):
        """Draws and writes one image's picture (a pool thread); holds only that image's rows of the batch."""
        heat = result.heatmaps[j]
        guided = result.guided[j] if result.guided is not None else None
        scores = result.scores[j]
        gb = result.extras["guided_backprop"][j] if panel else None
        cf_heat = contrary.heatmaps[j] if panel else None

        def write():
            folders.ensure(path.parent)
            if picture is None:  # a 1-D signal (map over time as a curve) or a 3-D volume (a map per slice)
                sample = tensor[0]
                h = heat if info.kind != "pixel" else render.unit_scale(np.abs(guided).sum(0))
                image = render.curve(sample, h, title=f"{Path(item.path).name}: {method} for {describe(t)}") \
                    if sample.ndim == 2 else render.slices(sample, h, alpha=alpha)
                render.save_png(image, path, fast=True)
                return
            overlay = render.overlay(picture, heat, alpha=alpha)
            if isinstance(t, target_kinds.DetectionTarget):
                _draw_box(overlay, scores, t, tensor.shape, explainer.layout)
            if panel:
                gbi = render.gradient_image(gb, explainer.layout, picture.size)
                ggc = render.gradient_image(guided, explainer.layout, picture.size)
                cf = render.overlay(picture, cf_heat, alpha=alpha)
                image = render.panel([picture, overlay, gbi, ggc, cf],
                                     [f"{Path(item.path).name}", f"Grad-CAM '{describe(t)}'",
                                      f"Guided Backprop '{describe(t)}'", f"Guided Grad-CAM '{describe(t)}'",
                                      f"Counterfactual '{describe(t)}'"])
            elif info.kind == "pixel":
                image = render.gradient_image(guided, explainer.layout, picture.size)
            else:
                image = overlay
            render.save_png(image, path, fast=True)
        return write

    def process(batch):
        """Explains one batch (this thread), hands its pictures to the pool, and returns what reports it."""
        entries = [(item, tensor, picture) for item, (tensor, picture) in batch]
        groups, start = [], 0
        for i in range(1, len(entries) + 1):  # .npy samples of a dynamic-size model may differ in shape
            if i == len(entries) or entries[i][1].shape != entries[start][1].shape:
                groups.append(entries[start:i])
                start = i
        explained = [e for group in groups for e in explain_group(group)]
        explained.sort(key=lambda e: e[0][0].index)
        if explained and not state["said"]:
            state["said"] = True
            if assumed:
                click.echo(assumed, err=True)
        records, writes = [], []
        views = {}  # per result: one Explanation per target (several classes per image)
        for (item, tensor, picture), result, contrary, j in explained:
            if id(result) not in views:
                views[id(result)] = [result] if result.targets_per_sample is None else \
                    [result.per_target(q) for q in range(result.targets_per_sample)]
            for q, view in enumerate(views[id(result)]):
                path = paths[item.index] if draw else None
                if path is not None and multi:  # cat_gradcam_top1.png / cat_gradcam_281.png
                    which = f"top{q + 1}" if top_k_maps is not None else str(int(view.targets[j]))
                    path = path.with_name(f"{path.stem}_{which}{path.suffix}")
                rec, t = record(item, path, view, j)
                rec["k"] = q
                records.append(rec)
                if draw:
                    writes.append(pool.submit(picture_job(item, path, tensor, picture, view, contrary, j, t)))
            if maps_out is not None:  # several targets: (K, ...) per image, in the order of the records
                maps_out.add(item.name, (result.maps if maps_size == "layer" else result.heatmaps)[j])
        del batch, entries, groups, explained

        def finish():
            for w in writes:
                w.result()  # a write that failed (disk full) ends the run with its one line
            writes.clear()
            for rec in records:
                if results_out is not None:
                    results_out.add({"path": rec["image"], "k": rec["k"], "target": rec["target"],
                                     "label": rec["target_label"],
                                     "score": rec["score"], "probability": rec["probability"],
                                     "layer": ",".join(rec["layers"]), "method": rec["method"]})
                _report(rec, as_json, method, options)
            if results_out is not None:
                results_out.flush()
            progress.update(len(records))
        return finish

    pool = ThreadPoolExecutor(max_workers=dataset.workers(), thread_name_prefix="onnxcam-io")
    try:
        dataset.stream_batches(items, load, batch_size, pool, process, skip if len(items) > 1 else None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
        try:
            if maps_out is not None:
                maps_out.close()
        finally:
            if results_out is not None:
                results_out.close()
    if state["skipped"]:
        if not state["explained"]:
            _fail(f"none of the {len(items)} images could be read (each is named above)")
        click.echo(f"onnxcam: skipped {state['skipped']} of {len(items)} images (named above); the other "
                   f"{state['explained']} were explained", err=True)
        ctx.exit(1)


def _explain_on_ray(model, images, out, address, *, overrides, unsupported, **options) -> None:
    """`onnxcam explain ... --ray [ADDRESS]`: the folder through onnxcam.ray's pipeline into Parquet files."""
    from ..ray import explain_folder

    given = [flag for flag, value in unsupported.items() if value not in (None, False, (), [])]
    if given:
        _fail(f"--ray writes one Parquet row per image (target, label, score, probability, heatmap); "
              f"{', '.join(given)} go without it")
    if out is None:
        _fail("--ray needs -o FOLDER: where the Parquet files go")
    for path in images:
        if "://" not in path and not os.path.exists(path):
            _fail(f"not found: {path}")
    summary = explain_folder(model, list(images), out, address=None if address == "local" else address,
                             **overrides, **{k: v for k, v in options.items() if v is not None})
    click.echo(f"wrote {summary['rows']} rows to {summary['out_dir']} in {summary['seconds']:.1f} s "
               f"({summary['images_per_second']:.1f} images/s)" +
               (f"; {summary['errors']} unreadable (see the 'error' column)" if summary["errors"] else ""))
    if summary["errors"]:
        raise click.exceptions.Exit(1)


def _report(rec: dict, as_json: bool, method: str, options: str) -> None:
    """One image's lines on stdout (its notes and warnings on stderr), or its JSON line."""
    if as_json:
        click.echo(json.dumps(rec, separators=(",", ":")))
        return
    what = f"{rec['target']} (score {rec['target_score']:.4f})" if rec["target_score"] is not None else \
        f"class {rec['target']} ({rec['target_label']})"
    where = "from the input gradient" if method in ("guided-backprop", "deconvnet") else \
        f"at layer {', '.join(rec['layers'])}"
    to = f" -> {rec['output']}" if rec["output"] is not None else ""
    click.echo(f"{rec['image']}: {method}{options} for {what} {where}{to} [{rec['provider']}]")
    if rec["note"]:
        click.echo(f"onnxcam: note: {rec['image']}: {rec['note']}", err=True)
    for w in rec["warnings"]:
        click.echo(f"onnxcam: warning: {rec['image']}: {w}", err=True)
    for rank, entry in enumerate(rec["top"], 1):
        click.echo(f"  {rank}. {entry['label']:<30} class {entry['class']:>5}  score {entry['score']:9.4f}  "
                   f"p={entry['probability']:.4f}")




def _fmt_floats(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _layer_names(layers) -> list[str] | None:
    """--layer, repeated or comma-separated."""
    names = [name.strip() for value in layers for name in value.split(",") if name.strip()]
    return names or None


def _draw_box(picture, scores: np.ndarray, t, tensor_shape, layout: str) -> None:
    """The explained detection's box (x, y, w, h in input pixels, YOLO's convention) on the overlay."""
    from PIL import ImageDraw

    per_box = scores if t.fields(scores.shape)[0] == "yolov5" else scores.T
    cx, cy, w, h = (float(v) for v in per_box[t.box, :4])
    in_h, in_w = (tensor_shape[1], tensor_shape[2]) if layout == "NHWC" else (tensor_shape[-2], tensor_shape[-1])
    sx, sy = picture.width / in_w, picture.height / in_h
    w, h = abs(w), abs(h)
    xy = [(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy]
    ImageDraw.Draw(picture).rectangle(xy, outline=(0, 255, 0), width=max(2, picture.width // 200))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--output-name", "output_name", help="Model output to explain (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def layers(model, output_name, as_json):
    """List the feature maps Grad-CAM can use; '*' marks the default."""
    from ..model import select
    from ..model.graph import ModelView, infer_shapes, load_model

    view = ModelView(infer_shapes(load_model(model)))
    image = select.image_input(view)
    score = select.find_score(view, output_name)
    cands = select.layer_candidates(view, image, score)
    if as_json:
        click.echo(json.dumps([{"name": c.name, "op": c.op, "shape": list(c.shape), "spatial": list(c.spatial),
                                "default": c.default, "layout": c.layout} for c in cands], indent=2))
        return
    click.echo(f"input: {image}   score: {score}")
    fmt = lambda dims: "x".join("?" if d is None else str(d) for d in dims)  # noqa: E731
    for c in cands:
        layout = f"  [{c.layout}]"
        click.echo(f"{'*' if c.default else ' '} {c.name}  {c.op}  {fmt(c.shape)}  spatial {fmt(c.spatial)}{layout}")


@cli.command("metadata")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, help="The model with its metadata (.onnx; weights kept "
                                                             "external, next to it, when the model's are).")
@_preprocessing_options
def metadata_cmd(model, out, labels_file, preset, mean, std, size, layout):
    """Store labels and preprocessing in a copy of MODEL (metadata `onnxcam.labels`, `onnxcam.preprocess`), so
    that explain, serve and evaluate read them instead of guessing."""
    from ..cam import export
    from ..model import select
    from ..model.graph import ModelView, infer_shapes, load_model

    source = load_model(model)
    view = ModelView(infer_shapes(source))
    image = select.image_input(view)
    existing = preprocess.model_metadata(source)
    props = {}
    if labels_file:
        labels = preprocess.labels_from_file(labels_file)
        score = view.shape(select.find_score(view))
        classes = int(np.prod(score[1:])) if score and all(isinstance(d, int) for d in score[1:]) else None
        if classes is not None and len(labels) != classes:
            raise OnnxcamError(f"{len(labels)} labels for a score with {classes} classes")
        props[preprocess.LABELS_KEY] = json.dumps(labels)
    given = _preprocessing_overrides(preset, mean, std, size, layout)
    if given:
        pp = preprocess.resolve_preprocess(view.shape(image), metadata=existing, **given)
        spec = {"mean": list(pp.mean), "std": list(pp.std), "scale": pp.scale, "channel_order": pp.channel_order,
                "layout": pp.layout}
        if size is not None or "size" in (existing.get("preprocess") or {}):
            spec["size"] = list(pp.size)
        props[preprocess.PREPROCESS_KEY] = json.dumps(spec)
    if not props:
        raise OnnxcamError("nothing to store: give --labels and/or --preset, --mean/--std, --size, --layout")
    kept = [p for p in source.metadata_props if p.key not in props]
    del source.metadata_props[:]
    source.metadata_props.extend(kept)
    for key, value in props.items():
        source.metadata_props.add(key=key, value=value)
    read = [*export.model_files(model, source), *([labels_file] if labels_file else [])]
    export.save_model(source, Path(out), read)
    click.echo(f"wrote {out}: {', '.join(sorted(props))}")


@cli.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, help="Where to write the explainable ONNX model.")
@click.option("--layer", "layers", multiple=True, help="ONNX tensor(s) to explain, repeated or comma-separated (default: automatic).")
@click.option("--method", default="gradcam", show_default=True,
              help=f"A gradient CAM method (the ones one graph computes): {', '.join(exportable_methods())}.")
@click.option("--heatmap-size", type=click.Choice(["input", "layer"]), default="input", show_default=True,
              help="Heatmap at the input's resolution, or at the layer's.")
@click.option("--output-name", "output_name", help="Model output to explain (default: the first).")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False),
              help="Also write a Triton model repository entry into this directory.")
@click.option("--triton-name", help="Model name in the Triton repository [default: the output's stem].")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(0, None),
              help="Triton max_batch_size (dynamic batching when > 0).")
def export_cmd(model, out, layers, method, heatmap_size, output_name, triton_dir, triton_name, max_batch):
    """Write MODEL plus a `target` input and a `heatmap` output as one ONNX graph."""
    from ..cam import export

    out_path = Path(out)
    if os.path.exists(model) and os.path.realpath(out_path) == os.path.realpath(model):
        _fail("the output would overwrite the input model")
    # The model's external-data files are inputs too: writing over one corrupts the model silently.
    export.guard_outputs([out_path], export.model_files(model))
    exported = export.export_model(model, layer=_layer_names(layers), method=method, heatmap_size=heatmap_size,
                                   output=output_name, inline_weights=False)  # external weights stay external
    inputs = export.model_files(model, exported)
    export.save_model(exported, out_path, inputs)
    click.echo(f"wrote {out_path}: inputs {', '.join(i.name for i in exported.graph.input)}; "
               f"outputs {', '.join(o.name for o in exported.graph.output)}")
    if triton_dir:
        root = export.write_triton_repository(exported, triton_dir, triton_name or out_path.stem, max_batch,
                                              inputs)
        click.echo(f"wrote Triton model repository entry {root}")


@cli.command("serve")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--name", help="Model name in the URLs [default: the model file's stem].")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, None),
              help="Most samples per explain call; 1 disables batching.")
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0, None),
              help="How long a batch waits for more samples after its first.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, None),
              help="Most samples waiting for a batch; more are answered 503.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, None),
              help="Threads running explain batches at the same time.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Largest request body; larger ones are answered 413.")
@click.option("--max-image-mp", default=40.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Largest image, in decoded megapixels; larger ones are answered 413.")
@click.option("--max-request-mp", default=100.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Decoded megapixels of all images in one request; more is answered 413.")
@click.option("--max-inflight-mp", default=100.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Decoded megapixels held by all requests together; a request that does not fit gets 503.")
@click.option("--max-overlay-side", default=1024, show_default=True, type=click.IntRange(1, None),
              help="Longest side of overlay images, in pixels.")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Seconds for a request's headers to arrive; then 408 and the connection is closed.")
@click.option("--body-timeout", default=60.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Seconds for a request's body to arrive after its headers; then 408.")
@click.option("--keep-alive-timeout", default=5.0, show_default=True, type=click.FloatRange(0, None, min_open=True),
              help="Seconds an idle connection is kept open.")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1, None),
              help="Open connections; requests beyond are answered 503.")
@click.option("--layer", "layers", multiple=True, help="ONNX tensor(s) to explain, repeated or comma-separated (default: automatic).")
@click.option("--method", default="gradcam", show_default=True, help=f"One of: {', '.join(methods.METHODS)}.")
@_preprocessing_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Serve from Ray Serve replicas, each with its own session (pip install 'onnxcam[ray]'). Without "
                   "ADDRESS a new local Ray instance; 'auto' or ray://HOST:PORT deploys on a cluster.")
@click.option("--replicas", type=click.IntRange(1, None), help="Ray Serve replicas (with --ray) [default: 1].")
@click.option("--replica-cpus", type=click.FloatRange(0, None),
              help="CPUs per replica (with --ray); onnxruntime uses as many threads [default: 1].")
@click.option("--replica-gpus", type=click.FloatRange(0, None),
              help="GPUs per replica (with --ray) [default: 1 with --device cuda/tensorrt, else 0].")
@_precision_options
@_device_option
@click.pass_context
def serve_cmd(ctx, model, host, port, name, max_batch, batch_wait_ms, max_queue, workers, max_body_mb, max_image_mp,
              max_request_mp, max_inflight_mp, max_overlay_side, header_timeout, body_timeout, keep_alive_timeout,
              max_connections, layers, method, preset, mean, std, size, layout, labels_file, device,
              ray_address=None, replicas=None, replica_cpus=None, replica_gpus=None, precision=None, calibration=()):
    """Serve MODEL over HTTP (KServe V1 and Open Inference Protocol v2) with micro-batching."""
    from .. import serve

    precision, calibration_images = _precision_choice(precision, calibration)

    overrides = _preprocessing_overrides(preset, mean, std, size, layout)
    labels = preprocess.labels_from_file(labels_file) if labels_file else None

    limits = serve.Limits(image_pixels=round(max_image_mp * 1e6), request_pixels=round(max_request_mp * 1e6),
                          inflight_pixels=round(max_inflight_mp * 1e6), overlay_side=max_overlay_side,
                          body_timeout=body_timeout)
    if ray_address is None:
        given = [f for f, v in (("--replicas", replicas), ("--replica-cpus", replica_cpus),
                                ("--replica-gpus", replica_gpus)) if v is not None]
        if given:
            _fail(f"{', '.join(given)} go with --ray")
    else:
        # Ray's proxy owns the connections: the single process's connection limits do not apply there.
        src = click.core.ParameterSource.COMMANDLINE
        given = [f"--{p.replace('_', '-')}" for p in ("workers", "header_timeout", "max_connections")
                 if ctx.get_parameter_source(p) == src]
        if given:
            _fail(f"{', '.join(given)} belong to the single-process server; Ray Serve's proxy has its own")
        from ..ray.serve import run as run_ray

        run_ray(model, replicas=replicas or 1, host=host, port=port, name=name, max_batch=max_batch,
                max_queue=max_queue, max_body_mb=max_body_mb, batch_wait_ms=batch_wait_ms, layer=_layer_names(layers),
                method=method, device=device, limits=limits, labels=labels, preprocess_overrides=overrides,
                num_cpus=1.0 if replica_cpus is None else replica_cpus, num_gpus=replica_gpus,
                keep_alive_timeout=keep_alive_timeout, address=None if ray_address == "local" else ray_address,
                precision=precision, calibration=calibration_images)
        return
    serve.run(model, host=host, port=port, name=name, max_batch=max_batch, max_queue=max_queue, workers=workers,
              max_body_mb=max_body_mb, batch_wait_ms=batch_wait_ms, layer=_layer_names(layers), method=method,
              device=device, limits=limits, header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
              max_connections=max_connections, labels=labels, preprocess_overrides=overrides, precision=precision,
              calibration=calibration_images)


def _rise_options(method: str, masks: int | None, cells: int | None) -> dict | None:
    given = {k: v for k, v in (("masks", masks), ("cells", cells)) if v is not None}
    if given and method.lower() != "rise":
        _fail("--rise-masks and --rise-cells belong to --method rise")
    return given or None


@cli.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path())
@click.option("--method", "method_names", multiple=True,
              help="Method to evaluate; repeat for several [default: gradcam]. Also the controls 'random' "
                   "(smooth noise) and 'center' (a centred Gaussian).")
@click.option("--layer", "layers", multiple=True, help="ONNX tensor(s) to explain, repeated or comma-separated (default: automatic).")
@click.option("--metrics", "metric_names", multiple=True,
              help="Comma-separated or repeated [default: all]: localization, pointing, deletion, insertion, "
                   "drop, road, occlusion.")
@click.option("-o", "--output", "out", help="Write the per-image results to this .csv or .json file.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, None),
              help="Images per onnxruntime run (explanations and perturbed images).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, None),
              help="Deletion/insertion steps (each changes 1/steps of the pixels).")
@click.option("--road-percentiles", default="10,20,30,40,50,60,70,80,90", show_default=True,
              help="ROAD's percentiles (pytorch-grad-cam's default).")
@click.option("--loc-threshold", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Localization keeps the map above this fraction of its maximum (the Grad-CAM paper's 15%).")
@click.option("--limit", type=click.IntRange(1, None), help="Evaluate only the first N samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the 'random' maps and ROAD's noise.")
@click.option("--preset", type=click.Choice(sorted(preprocess.PRESETS)), help="Input normalisation preset.")
@click.option("--size", help="Input size N or HxW (needed when the model's size is dynamic).")
@click.option("--controls", is_flag=True, help="Also run the controls 'random' and 'center' (for the verdicts).")
@click.option("--sanity", type=click.Choice(["cascading", "independent", "logit"]),
              help="Instead of the metrics, Adebayo et al.'s sanity checks: model-parameter randomisation "
                   "(cascading from the score, or one node at a time) or the random-logit test.")
@click.option("--sanity-steps", type=click.IntRange(1, None),
              help="With --sanity cascading/independent: this many randomisation steps [default: every node].")
@click.option("--plot", "plot_path", help="With --sanity: also draw the similarities into this .png file.")
@click.option("--rise-masks", type=click.IntRange(1, None),
              help="--method rise: random masks per image [default: 4000, the paper's].")
@_device_option
def evaluate_cmd(model, data, method_names, layers, metric_names, out, batch_size, steps, road_percentiles,
                 loc_threshold, limit, seed, preset, size, controls, sanity, sanity_steps, plot_path, device,
                 rise_masks=None):
    """Score explanations of MODEL on the images in DATA: localization (boxes), pointing game (masks),
    deletion/insertion, Average Drop / Increase in Confidence, ROAD, faithfulness to occlusion.
    DATA is a folder with annotations.json, one CSV (image,label,x0,y0,x1,y1) or Pascal VOC XMLs; see
    docs/evaluation.md. Prints a summary table per method and a verdict per method against the controls.
    With --sanity, runs Adebayo et al.'s sanity checks on the images instead (docs/evaluation.md)."""
    from .. import evaluate as ev
    from ..run.runtime import explicit_gpu, resolve_device

    providers = resolve_device(device)
    names = [m.strip() for item in metric_names for m in item.split(",") if m.strip()] or None
    percentiles = _parse_floats(road_percentiles, "road-percentiles")
    if any(not 0 < p < 100 for p in percentiles):
        _fail(f"--road-percentiles must lie strictly between 0 and 100, got '{road_percentiles}'")
    methods_list = list(dict.fromkeys(method_names)) or ["gradcam"]
    if controls:
        methods_list += [c for c in ev.PSEUDO_METHODS if c not in methods_list]
    if (sanity_steps or plot_path) and not sanity:
        _fail("--sanity-steps and --plot belong to --sanity")
    if out:
        from ..cam.export import model_files

        ev.check_output(out, [*model_files(model), data, *ev.input_files(data)])
    if not os.path.exists(data):
        _fail(f"data not found: {data}")
    if sanity:
        if plot_path and not plot_path.lower().endswith(".png"):
            _fail(f"--plot {plot_path} must be a .png file")
        if plot_path and not os.path.isdir(os.path.dirname(plot_path) or "."):
            _fail(f"cannot write {plot_path}: directory {os.path.dirname(plot_path)} does not exist")
        if controls:
            _fail("--controls compare metrics; the sanity checks compare a method with itself")
        total = ev.sanity_plan(model, sanity, sanity_steps, methods_list)
        with click.progressbar(length=total, label=f"sanity checks ({sanity})", file=sys.stderr) as bar:
            result = ev.sanity_check(model, data, methods_list, sanity, seed=seed, steps=sanity_steps, limit=limit,
                                     layer=_layer_names(layers), preset=preset, size=_parse_size(size),
                                     providers=providers, progress=bar.update)
        click.echo(result.table())
        if plot_path:
            result.plot(plot_path)
            click.echo(f"wrote {plot_path}")
        if out:
            result.write(out)
            click.echo(f"wrote {out}")
        return
    evaluator = ev.Evaluator(model, methods_list, layer=_layer_names(layers), metrics=names, batch_size=batch_size,
                             steps=steps, seed=seed, road_percentiles=percentiles, loc_threshold=loc_threshold,
                             preset=preset, size=_parse_size(size), providers=providers,
                             strict_device=explicit_gpu(device),
                             rise=_rise_options("rise" if "rise" in methods_list else "", rise_masks, None))
    provider = evaluator.session.get_providers()[0]
    samples = ev.load_dataset(data, evaluator.labels)[:limit]
    with click.progressbar(length=len(samples) * len(methods_list), label=f"evaluating on {provider}",
                           file=sys.stderr) as bar:
        result = evaluator.run(samples, bar.update)
    if out:
        result.write(out, {"model": str(model), "data": str(data), "methods": methods_list,
                           "metrics": evaluator.metrics, "steps": steps, "road_percentiles": percentiles,
                           "loc_threshold": loc_threshold, "seed": seed, "provider": provider})
    click.echo(result.table())
    for line in result.verdicts():
        click.echo(line)
    if out:
        click.echo(f"wrote {out}")


@cli.command("providers")
@click.argument("model", type=click.Path(dir_okay=False))
@_device_option
@click.option("--method", default="gradcam", show_default=True, help="Method whose explain graph is placed.")
@click.option("--layer", "layers", multiple=True, help="ONNX tensor(s) to explain, repeated or comma-separated (default: automatic).")
@click.option("--nodes", "show_nodes", is_flag=True, help="Also list every node: provider, op type, name.")
@click.option("--json", "as_json", is_flag=True, help="Print the placement as JSON.")
def providers_cmd(model, device, method, layers, show_nodes, as_json):
    """Which execution provider runs each node of MODEL's fused explain graph (from one profiled run);
    flags nodes that fell back to the CPU when a GPU provider was requested."""
    from collections import Counter

    from ..run.explainer import Explainer
    from ..run.placement import node_placement
    from ..run.runtime import CPU

    if not os.path.exists(model):
        _fail(f"model not found: {model}")
    explainer = Explainer(model, layer=_layer_names(layers), method=method, device=device)
    placement = node_placement(explainer)
    requested = explainer.session.get_providers()
    gpu = requested[0] != CPU
    fallback = placement.get(CPU, []) if gpu else []
    if as_json:
        click.echo(json.dumps({"model": str(model), "method": method, "device": device, "providers": requested,
                               "provider": explainer.provider,
                               "placement": {p: [{"name": n, "op": o} for n, o in nodes]
                                             for p, nodes in placement.items()},
                               "cpu_fallback": [{"name": n, "op": o} for n, o in fallback]}, indent=2))
        return
    total = sum(len(v) for v in placement.values())
    click.echo(f"{model}: {method} explain graph, {total} nodes after onnxruntime's optimisation; session "
               f"providers {', '.join(requested)} [{explainer.provider}]")
    for provider, nodes in sorted(placement.items(), key=lambda kv: -len(kv[1])):
        ops_count = Counter(o for _, o in nodes)
        click.echo(f"  {provider}: {len(nodes)} nodes")
        click.echo("    " + ", ".join(f"{op} {c}" for op, c in sorted(ops_count.items(), key=lambda kv: (-kv[1], kv[0]))))
    if gpu:
        if fallback:
            click.echo(f"CPU fallback: {len(fallback)} node(s) run on {CPU} although {requested[0]} was requested:")
            for n, o in fallback:
                click.echo(f"  ! {o:<20} {n}")
        else:
            click.echo(f"no CPU fallback: every node runs on {', '.join(sorted(placement))}")
    if show_nodes:
        for provider, nodes in placement.items():
            for n, o in nodes:
                click.echo(f"{provider}\t{o}\t{n}")


@cli.command()
@click.option("--markdown", is_flag=True, help="The coverage table of docs/ops.md.")
def ops(markdown):
    """List the ONNX ops that have a gradient rule."""
    from ..autodiff.rules import coverage_markdown, supported_ops

    if markdown:
        click.echo(coverage_markdown(), nl=False)
        return
    for op in supported_ops():
        click.echo(op)


def main(argv=None) -> int:
    try:
        # standalone_mode=False hands back ctx.exit()'s status: explain's 1 when it skipped an unreadable image
        status = cli.main(args=argv, prog_name="onnxcam", standalone_mode=False)
    except OnnxcamError as exc:
        click.echo(f"onnxcam: error: {exc}", err=True)
        return EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("onnxcam: aborted", err=True)
        return 130
    except click.UsageError as exc:  # click's own multi-line usage block, folded into one line
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"onnxcam: error: {exc.format_message()}{hint}", err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        click.echo(f"onnxcam: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("onnxcam: interrupted", err=True)
        return 130
    except ImportError as exc:  # onnxruntime (or the serve extra) not installed: the message says what to install
        click.echo(f"onnxcam: error: {first_line(exc)}", err=True)
        return 1
    except Exception as exc:  # a bug of ours: still one line, but say so
        text = str(exc).strip().splitlines()
        click.echo(f"onnxcam: internal error: {type(exc).__name__}: {text[0] if text else ''}", err=True)
        return 1
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
