"""Command line: `onnxcam explain`, `layers`, `ops`, `export`, `serve`, `evaluate`, `providers`.

Every user-facing failure is an OnnxcamError printed as one line with exit status 2; nothing the user
gave (model, images) is ever written to.
"""
from __future__ import annotations

import json
import re
import os
import sys
from pathlib import Path

import click
import numpy as np

from ..cam import methods
from ..cam import targets as target_kinds
from . import inputs
from ..images import preprocess, render
from ..errors import OnnxcamError, first_line
from ..images.labels import match_label
from ..cam.methods import exportable_methods
from ..model.safeio import regular_file

EXIT_USAGE = 2


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


def _output_paths(images: list[str], out: str | None, suffix: str) -> tuple[list[Path], Path | None]:
    """One PNG per image: OUT itself when it names a .png/.jpg and there is one image, else files in OUT/.
    Only checks; returns the paths and the folder still to create (nothing is created before the model has
    loaded, so a failed run leaves no empty folder behind)."""
    to_create = None
    suffix_of_out = Path(out).suffix.lower() if out is not None else ""
    if suffix_of_out and not Path(out).is_dir():
        if suffix_of_out not in render.IMAGE_FORMATS:
            raise OnnxcamError(f"-o {out}: '{suffix_of_out}' is not an image format onnxcam writes (use "
                               f"{', '.join(render.IMAGE_FORMATS)}), nor an existing folder")
        if len(images) > 1:
            raise OnnxcamError(f"-o {out} names one file but {len(images)} images were given; give a folder")
    if out is not None and len(images) == 1 and suffix_of_out in render.IMAGE_FORMATS:
        paths = [Path(out)]
    else:
        folder = Path(out) if out is not None else Path("onnxcam-out")
        if folder.exists() and not folder.is_dir():
            raise OnnxcamError(f"output {folder} exists and is not a directory")
        if not folder.exists():
            to_create = folder
        stems: dict[str, int] = {}
        paths = []
        for img in images:
            stem = Path(img).stem
            stems[stem] = stems.get(stem, 0) + 1
            tag = "" if stems[stem] == 1 else f"_{stems[stem]}"
            paths.append(folder / f"{stem}{tag}_{suffix}.png")
    inputs = {os.path.realpath(p) for p in images}
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


def _make_folder(folder: Path | None) -> None:
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxcamError(f"cannot create output directory {folder}: {exc.strerror or exc}") from None


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
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", help="Output PNG (one image) or directory [default: onnxcam-out/].")
@click.option("--layer", "layers", multiple=True,
              help="ONNX tensor to explain (default: the last spatial feature map; see `onnxcam layers`). "
                   "Repeat, or separate with commas, to average several layers.")
@click.option("--target", help="Class index or label to explain (default: the top-scoring class), or an index "
                                "tuple into one sample's output, e.g. 0,3,5 (see docs/targets.md).")
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
              help="Perturbed images per run (Score-CAM, Ablation-CAM).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--batch-axis", "batch_axis", type=int, default=None,
              help="Axis of the explained output that holds the samples (default: found from the graph; "
                   "e.g. 1 for (T, N, K) CTC logits).")
@_device_option
def explain(model, images, out, layers, target, method, counterfactual, aug_smooth, eigen_smooth, output_name,
            preset, mean, std, size, layout, labels_file, panel, alpha, top, batch_size, as_json, batch_axis, device,
            region=None, box=None, field=None, extra_inputs=()):
    """Write a CAM overlay PNG for each IMAGE and print the top classes."""
    from ..run.explainer import Explainer

    info = methods.get_method(method)
    method = info.name
    if panel and method not in ("gradcam", "guided-gradcam", "guided-backprop"):
        _fail("--panel shows Grad-CAM with Guided Backprop (the paper's Figure 1); use it with --method gradcam")
    if counterfactual and not info.uses_gradients:
        _fail(f"--counterfactual needs gradients; method '{method}' uses none")
    for img in images:
        if not os.path.exists(img):
            _fail(f"image not found: {img}")
    overrides = _preprocessing_overrides(preset, mean, std, size, layout)
    tag = "panel" if panel else ("counterfactual" if counterfactual else method.replace("+", "p"))
    paths, folder = _output_paths(list(images), out, tag)
    from ..cam.export import guard_outputs, model_files

    read = [*model_files(model), *([labels_file] if labels_file else []),
            *(e.split("=", 1)[1] for e in extra_inputs if "=" in e),
            *([region.split(":", 1)[1]] if region and ":" in region else [])]
    guard_outputs(paths, read)
    explainer = Explainer(model, layer=_layer_names(layers), method="guided-gradcam" if panel else method,
                          output=output_name, batch_size=batch_size, device=device, batch_axis=batch_axis)
    model_outputs = [o.name for o in explainer.source_model.graph.output]
    if folder is not None and out is not None and out in model_outputs:
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
    other_inputs = inputs.load_inputs(extra_inputs, explainer)
    assumed = None  # said once the run has succeeded: a failed run prints its one error line only
    as_arrays = _tensor_inputs(images, explainer)
    if as_arrays:  # signals and volumes (or preprocessed tensors): given as they enter the model
        if panel:
            _fail("--panel shows 2-D images; this input is given as .npy tensors")
        tensors = [_load_sample(img, explainer) for img in images]
        pils = [render.tensor_image(t[0], explainer.layout) if t.ndim == 4 else None for t in tensors]
    else:
        pp = explainer.preprocessing(**overrides)
        pils = [preprocess.load_image(img) for img in images]
        tensors = [preprocess.to_tensor(p, pp) for p in pils]
        if pp.source == "default":  # a plausible map from the wrong normalisation would pass unnoticed
            assumed = (f"onnxcam: note: {model} carries no preprocessing metadata; normalising as ImageNet "
                       f"(mean {_fmt_floats(pp.mean)}, std {_fmt_floats(pp.std)} on 0..1 RGB). Pass --preset or "
                       f"--mean/--std, or store it in the model with `onnxcam metadata`")
        # The overlay is a picture of a map at most 2048 px across: blending a 6000x4000 photo at full size cost
        # 12.8 s and 1.9 GB for no visible gain. A panel's five tiles get 1024 px each.
        pils = [render.fit(p, PANEL_SIDE if panel else OVERLAY_SIDE) for p in pils]
    opts = dict(aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)

    def run(batch: np.ndarray, cf: bool, progress=None):
        return explainer.explain(inputs.batch_feeds(explainer, batch, other_inputs), target_index,
                                 counterfactual=cf, progress=progress, **opts)

    def run_all(cf: bool):
        total = explainer.perturbation_count(len(tensors)) * (6 if aug_smooth else 1)
        if total:
            with click.progressbar(length=total, label=f"{method}: perturbed forward passes",
                                   file=sys.stderr) as bar:
                return run(np.concatenate(tensors), cf, bar.update)
        return run(np.concatenate(tensors), cf)  # a one-sample graph is run sample by sample by the Explainer

    result = run_all(counterfactual and not panel)
    contrary = run_all(True) if panel else None

    name = (lambda i: target_kinds.describe(i) if isinstance(i, target_kinds.Target)
            else labels[i] if labels is not None and i < len(labels) else str(i))
    _make_folder(folder)
    records = []
    for i, (img, pil, path) in enumerate(zip(images, pils, paths)):
        t = result.targets[i] if result.target_scores is not None else int(result.targets[i])
        if pil is None:  # a 1-D signal (map over time as a curve) or a 3-D volume (a map per slice)
            sample = tensors[i][0]
            heat = result.heatmaps[i] if info.kind != "pixel" else render.unit_scale(np.abs(result.guided[i]).sum(0))
            picture = render.curve(sample, heat, title=f"{Path(img).name}: {method} for {name(t)}") \
                if sample.ndim == 2 else render.slices(sample, heat, alpha=alpha)
            render.save_png(picture, path)
        overlay = render.overlay(pil, result.heatmaps[i], alpha=alpha) if pil is not None else None
        if overlay is not None and isinstance(t, target_kinds.DetectionTarget):
            _draw_box(overlay, result.scores[i], t, tensors[i].shape, explainer.layout)
        if pil is None:
            pass
        elif panel:
            gb = render.gradient_image(result.extras["guided_backprop"][i], explainer.layout, pil.size)
            ggc = render.gradient_image(result.guided[i], explainer.layout, pil.size)
            cf = render.overlay(pil, contrary.heatmaps[i], alpha=alpha)
            picture = render.panel([pil, overlay, gb, ggc, cf],
                                   [f"{Path(img).name}", f"Grad-CAM '{name(t)}'", f"Guided Backprop '{name(t)}'",
                                    f"Guided Grad-CAM '{name(t)}'", f"Counterfactual '{name(t)}'"])
        elif info.kind == "pixel":
            picture = render.gradient_image(result.guided[i], explainer.layout, pil.size)
        else:
            picture = overlay
        if pil is not None:
            render.save_png(picture, path)
        scores = result.scores[i]
        probs = _softmax(scores.astype(np.float64))
        order = np.argsort(-scores)[:top] if scores.ndim == 1 else []  # a class list only for (N, K) scores
        records.append({
            "image": img, "output": str(path), "layers": list(explainer.layers), "method": method,
            "counterfactual": counterfactual, "target": name(t) if result.target_scores is not None else t,
            "target_label": name(t), "provider": explainer.provider,
            "top": [{"class": int(c), "label": name(int(c)), "score": float(scores[c]),
                     "probability": float(probs[c])} for c in order],
        })
        if result.target_scores is not None:  # the differentiated scalar y = <W, score>
            records[-1]["target_score"] = float(result.target_scores[i])
        records[-1]["warnings"] = [re.sub(r"^sample \d+ ", "", w) for w in result.warnings
                                   if re.match(rf"sample {i}\b", w)]
        if (isinstance(t, target_kinds.RegionTarget) and t.mask is None and scores.ndim >= 2
                and not (scores.argmax(0) == t.cls).any()):
            records[-1]["note"] = f"class {t.cls} owns no pixel of the predicted mask: the region and its map are empty"
    if assumed:
        click.echo(assumed, err=True)
    if as_json:
        click.echo(json.dumps(records if len(records) > 1 else records[0], indent=2))
        return
    options = "".join(f" ({name})" for name, on in (("counterfactual", counterfactual and not panel),
                                                     ("aug-smooth", aug_smooth), ("eigen-smooth", eigen_smooth)) if on)
    for rec in records:
        what = f"{rec['target']} (score {rec['target_score']:.4f})" if "target_score" in rec else \
            f"class {rec['target']} ({rec['target_label']})"
        where = "from the input gradient" if method in ("guided-backprop", "deconvnet") else \
            f"at layer {', '.join(rec['layers'])}"
        click.echo(f"{rec['image']}: {method}{options} for {what} {where} -> {rec['output']} [{rec['provider']}]")
        if "note" in rec:
            click.echo(f"onnxcam: note: {rec['image']}: {rec['note']}", err=True)
        for w in rec["warnings"]:
            click.echo(f"onnxcam: warning: {rec['image']}: {w}", err=True)
        for rank, entry in enumerate(rec["top"], 1):
            click.echo(f"  {rank}. {entry['label']:<30} class {entry['class']:>5}  score {entry['score']:9.4f}  "
                       f"p={entry['probability']:.4f}")


OVERLAY_SIDE, PANEL_SIDE = 2048, 1024


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
@_device_option
def serve_cmd(model, host, port, name, max_batch, batch_wait_ms, max_queue, workers, max_body_mb, max_image_mp,
              max_request_mp, max_inflight_mp, max_overlay_side, header_timeout, body_timeout, keep_alive_timeout,
              max_connections, layers, method, preset, mean, std, size, layout, labels_file, device):
    """Serve MODEL over HTTP (KServe V1 and Open Inference Protocol v2) with micro-batching."""
    from .. import serve

    overrides = _preprocessing_overrides(preset, mean, std, size, layout)
    labels = preprocess.labels_from_file(labels_file) if labels_file else None

    limits = serve.Limits(image_pixels=round(max_image_mp * 1e6), request_pixels=round(max_request_mp * 1e6),
                          inflight_pixels=round(max_inflight_mp * 1e6), overlay_side=max_overlay_side,
                          body_timeout=body_timeout)
    serve.run(model, host=host, port=port, name=name, max_batch=max_batch, max_queue=max_queue, workers=workers,
              max_body_mb=max_body_mb, batch_wait_ms=batch_wait_ms, layer=_layer_names(layers), method=method,
              device=device, limits=limits, header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
              max_connections=max_connections, labels=labels, preprocess_overrides=overrides)


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
@_device_option
def evaluate_cmd(model, data, method_names, layers, metric_names, out, batch_size, steps, road_percentiles,
                 loc_threshold, limit, seed, preset, size, device):
    """Score explanations of MODEL on the images in DATA: localization (boxes), pointing game (masks),
    deletion/insertion, Average Drop / Increase in Confidence, ROAD, faithfulness to occlusion.
    DATA is a folder with annotations.json, one CSV (image,label,x0,y0,x1,y1) or Pascal VOC XMLs; see
    docs/evaluation.md. Prints a summary table per method."""
    from .. import evaluate as ev
    from ..run.runtime import explicit_gpu, resolve_device

    providers = resolve_device(device)
    names = [m.strip() for item in metric_names for m in item.split(",") if m.strip()] or None
    percentiles = _parse_floats(road_percentiles, "road-percentiles")
    if any(not 0 < p < 100 for p in percentiles):
        _fail(f"--road-percentiles must lie strictly between 0 and 100, got '{road_percentiles}'")
    methods_list = list(dict.fromkeys(method_names)) or ["gradcam"]
    if out:
        from ..cam.export import model_files

        ev.check_output(out, [*model_files(model), data, *ev.input_files(data)])
    if not os.path.exists(data):
        _fail(f"data not found: {data}")
    evaluator = ev.Evaluator(model, methods_list, layer=_layer_names(layers), metrics=names, batch_size=batch_size,
                             steps=steps, seed=seed, road_percentiles=percentiles, loc_threshold=loc_threshold,
                             preset=preset, size=_parse_size(size), providers=providers,
                             strict_device=explicit_gpu(device))
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
        cli.main(args=argv, prog_name="onnxcam", standalone_mode=False)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
