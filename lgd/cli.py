"""`lgd train | eval | predict | export | summary | config | visualize | data synth|convert|tile|stats` — the command
line."""
from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torchvision

from lgd import __version__
from lgd.choices import CROWDHUMAN_BOXES, FORMATS
from lgd.config import SynthConfig
from lgd.errors import LGDError, count, user_message
from lgd.evaluation import EvalResult, format_percent, teacher_ahead
from lgd.utils.files import to_json
from lgd.utils.streams import outliving_reader

OVERRIDES_HELP = "config overrides as dotted KEY=VALUE, e.g. solver.max_iter=200 data.train.root=/data/coco/train2017"


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the default when stderr is not a terminal, e.g. a log file)")


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal: redrawn bars written to a log file leave cursor codes between the lines."""
    return not args.no_progress and sys.stderr.isatty()


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/); defaults apply to keys it does not set")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    _no_progress(p)


# Longer than our ~60-line rule on purpose: one declarative table of every command and option, read top to bottom.
def build_parser() -> argparse.ArgumentParser:
    """The ``lgd`` argument parser: one subcommand per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="lgd",
        description="Train, evaluate, export and use torchvision detectors with label-guided self-distillation (LGD).",
    )
    parser.add_argument("--version", action="version",
                        version=f"lgd {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a detector (with LGD unless lgd.enabled=false), then evaluate on val",
                       description="Train as the config says, write checkpoints, metrics.jsonl, TensorBoard events "
                                   "and plots to output_dir, then print the val split's metric (data.metric). With no dataset "
                                   "configured, the built-in synthetic dataset is generated once and used. "
                                   "Several GPUs or machines: launch with torchrun, e.g. "
                                   "`torchrun --nproc_per_node=8 -m lgd train -c CONFIG` (data.batch_size stays the "
                                   "global batch). SIGINT/SIGTERM finish the step, write a checkpoint and exit "
                                   "with status 130/143.")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from output_dir/last.pth exactly where it stopped")

    p = sub.add_parser("eval", help="AP of a trained model on a split (COCO, VOC or CrowdHuman metric)",
                       description="Evaluate a checkpoint: the metric's summary (COCO: 12 numbers), a per-class AP "
                                   "table, all in percent, and the detections JSON (written next to the checkpoint).")
    _config_args(p)
    p.add_argument("--weights", help="checkpoint to evaluate (default: output_dir/model_final.pth)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="which split (default: val)")
    p.add_argument("--teacher", action="store_true",
                   help="also evaluate the teacher diagnostic, printed beside the student's AP: the head run on the "
                        "implicit teacher's features, which are built from the ground-truth labels (so it is no "
                        "deployable model). Above the student, the teacher has something to teach; below, it has not")

    p = sub.add_parser("predict", help="detect objects in an image or a folder of images",
                       description="Write detections.json (every detection scoring at least the threshold) and one PNG per "
                                   "image: one class-coloured box per object with its class name and score, "
                                   "small images drawn upscaled. An image that cannot be read is reported and "
                                   "skipped; exit status 1 then, 0 when every image was predicted. Large images: "
                                   "--tile predicts overlapping tiles and merges them.")
    p.add_argument("input", help="an image file or a folder of images (its top level; hidden files are left out)")
    p.add_argument("--model", required=True, help="a student written by `lgd export`")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="drawn and saved detections score at least this (default: 0.3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-detections", type=int, metavar="N",
                   help="detections kept per image, the best-scoring (default: the model's model.detections_per_img, "
                        "100 unless trained otherwise); an image that reaches it is reported")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="large images: predict tiles of SIZE x SIZE px, each at its own resolution, and merge them "
                        "(default: the whole image, resized to the model's input size)")
    p.add_argument("--overlap", type=float, help="with --tile: the fraction of SIZE neighbouring tiles "
                                                              "share (default 0.2)")
    p.add_argument("--merge-thresh", type=float,
                   help="with --tile: boxes of one class from two tiles are one object when their intersection covers "
                        "more than this fraction of the smaller box (default 0.5)")
    _no_progress(p)

    p = sub.add_parser("export", help="write the student alone: weights + metadata, or an ONNX graph",
                       description="pth: the student's weights and the metadata that rebuilds it as a plain "
                                   "torchvision detector; loads with torch.load(weights_only=True) (see README). "
                                   "onnx: one image in, boxes/scores/labels out, checked against PyTorch with "
                                   "onnxruntime on a few training images (needs pip install -e \".[onnx]\").")
    _config_args(p)
    p.add_argument("--weights", help="checkpoint (default: output_dir/model_final.pth)")
    p.add_argument("--format", default="pth", choices=("pth", "onnx"), help="pth (default) or onnx")
    p.add_argument("--out", help="output file (default: output_dir/student.pth or student.onnx)")

    p = sub.add_parser("summary", help="parameter counts of student, teacher and adapter as JSON",
                       description="Count the parameters of the student (the deployed detector), LGD's teacher and "
                                   "adapter (training only) for a config, as JSON. No weights are loaded and no "
                                   "dataset is read when --num-classes is given.")
    _config_args(p)
    p.add_argument("--num-classes", type=int, help="K (default: the training dataset's category count)")

    p = sub.add_parser("config", help="list every config key, or print a resolved config",
                       description="Without -c or KEY=VALUE: every config key with its default and meaning. With "
                                   "them: the resolved config (file, its _base_ files and the overrides, over the "
                                   "defaults) as YAML, as training would write it to config.yaml.")
    _config_args(p)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    s = data_sub.add_parser("synth", help="write the built-in synthetic dataset in COCO format",
                            description="Write the built-in synthetic dataset (shapes on cluttered backgrounds, the "
                                        "dataset the configs train on when no dataset is given) as COCO: OUT/train, "
                                        "OUT/val, OUT/test image folders and OUT/annotations/instances_<split>.json. "
                                        "The data.synth.* config keys set its difficulty; this tool writes the "
                                        "default configuration.")
    s.add_argument("--out", required=True, help="output folder")
    synth = SynthConfig()  # the tool writes the dataset that data.synth.* gives by default
    s.add_argument("--seed", type=int, default=synth.seed,
                   help=f"seed (default {synth.seed}); splits use seeds derived from it")
    s.add_argument("--train", type=int, default=synth.num_train, help=f"training images (default {synth.num_train})")
    s.add_argument("--val", type=int, default=synth.num_val, help=f"validation images (default {synth.num_val})")
    s.add_argument("--test", type=int, default=synth.num_test, help=f"test images (default {synth.num_test})")
    s.add_argument("--size", type=int, default=synth.size, help=f"image side in pixels (default {synth.size})")
    _no_progress(s)
    s = data_sub.add_parser("convert", help="convert Pascal VOC, YOLO, CrowdHuman or CSV annotations to a COCO JSON",
                            description="Write a COCO instances JSON and print the data.<split>.root/ann to train "
                                        "with it. Training configs can also read these formats directly "
                                        "(data.<split>.format); see README, 'Other dataset formats'.")
    s.add_argument("--from", dest="fmt", required=True, choices=FORMATS[1:], help="source format")
    s.add_argument("--root", required=True,
                   help="VOC: the VOC2007/VOC2012 folder, or the images' folder of a labelImg folder; YOLO: the image "
                        "folder; CrowdHuman: the Images folder; CSV: the folder image paths are relative to")
    s.add_argument("--ann", required=True, help="VOC: ImageSets/Main split name (e.g. trainval), a split .txt, or a "
                                                "folder of XML files (labelImg); YOLO: the labels folder; "
                                                "CrowdHuman: the .odgt file; CSV: the image_path,xmin,ymin,xmax,"
                                                "ymax,label file")
    s.add_argument("--names", default="", help="class names file, one per line, a YOLO data.yaml or a keras-retinanet "
                                               "classes .csv (YOLO, CSV: required; VOC: default the 20 VOC classes)")
    s.add_argument("--class-map", default="", help="class renames as YAML, e.g. '{Alive: Tree, Dead: Tree}' (null "
                                                   "drops a class); as data.class_map")
    s.add_argument("--box", default="full", choices=CROWDHUMAN_BOXES, help="CrowdHuman box type (default full)")
    s.add_argument("--out", required=True, help="the COCO JSON to write")
    _no_progress(s)
    s = data_sub.add_parser("tile", help="cut a COCO split's large images into overlapping tiles, boxes clipped",
                            description="Write OUT/images/ (PNG tiles) and OUT/annotations.json (COCO) and print "
                                        "the data.<split>.root/ann to train with. A box clipped by a tile keeps its "
                                        "part there if that holds at least --min-fraction of its area, else it is "
                                        "dropped from that tile (counted). Boxes only: segmentations are left out.")
    s.add_argument("--root", required=True, help="the image folder the COCO file_names are relative to")
    s.add_argument("--ann", required=True, help="the COCO instances JSON (other formats: `lgd data convert` first)")
    s.add_argument("--size", type=int, default=512, help="tile side in pixels (default 512)")
    s.add_argument("--overlap", type=float, default=0.2, help="fraction of the side neighbouring tiles share "
                                                              "(default 0.2)")
    s.add_argument("--min-fraction", type=float, default=0.5,
                   help="a box cut by a tile stays there when at least this fraction of it is inside (default 0.5)")
    s.add_argument("--out", required=True, help="output folder")
    _no_progress(s)
    s = data_sub.add_parser("stats", help="images, objects, class histogram and object sizes of a split (+ PNG)",
                            description="Print a split's statistics and plot its class histogram and object size "
                                        "distribution; any format the config can read.")
    _config_args(s)
    s.add_argument("--split", default="train", choices=("train", "val", "test"), help="which split (default: train)")
    s.add_argument("--out", help="PNG to write (default: output_dir/stats_<split>.png)")

    p = sub.add_parser("visualize", help="student FPN features beside the teacher's knowledge maps, as a PNG",
                       description="For one image of a split: the image with its ground-truth boxes, then per FPN "
                                   "level the student's feature energy (L2 norm over channels) beside the implicit "
                                   "teacher's instructive-knowledge energy, each with the boxes drawn.")
    _config_args(p)
    p.add_argument("--weights", help="checkpoint (default: output_dir/model_final.pth)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="which split (default: val)")
    p.add_argument("--image", help="image id or file name in the split (default: the first image with objects)")
    p.add_argument("--out", help="PNG to write (default: output_dir/feature_maps_<split>_<image id>.png)")
    p.add_argument("--fgfi-mask", action="store_true",
                   help="draw FGFI's imitation mask (fgfi.psi) beside the student instead of the teacher's maps "
                        "(always so for a distill.method=fgfi run)")
    return parser


def _load(args: argparse.Namespace):
    from lgd.config import load_config

    return load_config(args.config, args.overrides)


def _print_result(result: EvalResult, title: str) -> None:
    for iou_type, text in result.summary.items():
        print(f"\n{title} — {iou_type} (percent)\n{text}\n\n{result.table(iou_type)}")


def _headline(result: EvalResult) -> str:
    """E.g. "bbox AP 36.31 %"."""
    return f"{result.headline.replace('/', ' ')} {format_percent(result.metrics[result.headline])}"


def cmd_train(args: argparse.Namespace) -> None:
    from lgd.engine.signals import TrainingInterrupted
    from lgd.engine.training import train

    cfg = _load(args)
    try:
        out = train(cfg, resume=args.resume, progress=_progress(args))
    except TrainingInterrupted as e:
        if e.is_main:
            print(f"lgd: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    if out["result"] is None:  # a torchrun process other than rank 0: rank 0 reports
        return
    result = out["result"]
    _print_result(result, f"{result.name} evaluation on val after {cfg.solver.max_iter} iterations")
    print(f"\nval {_headline(result)}  (outputs in {cfg.output_dir})")


def cmd_eval(args: argparse.Namespace) -> None:
    from lgd.config import distill_method
    from lgd.engine.checkpoint import load_trained
    from lgd.engine.checkpoint import FINAL
    from lgd.evaluation.evaluator import evaluate
    from lgd.utils.env import resolve_device

    cfg = _load(args)
    weights = Path(args.weights or Path(cfg.output_dir) / FINAL)
    device = resolve_device(cfg.device)
    if args.teacher and distill_method(cfg) != "lgd":
        raise LGDError("--teacher: the teacher diagnostic needs an LGD run (lgd.enabled=true); this config trains "
                       f"with distill.method={distill_method(cfg)}")
    model, dataset = load_trained(cfg, args.split, weights)
    model.to(device)
    results, written = {}, []
    for name in ("student", "teacher") if args.teacher else ("student",):
        out_file = weights.parent / f"detections_{args.split}_{name}.json"
        results[name] = evaluate(model, dataset, cfg, device, teacher=name == "teacher", out_file=out_file,
                                 progress=_progress(args), desc=f"eval {name} ({args.split})", split=args.split)
        written.append(out_file)
    student = results["student"]
    _print_result(student, f"{student.name} evaluation of {weights} on {args.split}")
    if args.teacher:
        teacher = results["teacher"]
        _print_result(teacher, f"TEACHER DIAGNOSTIC on {args.split}: the head on the implicit teacher's features, "
                               "built from the ground-truth labels")
        print(f"\n{args.split} {_headline(student)} (student) | {_headline(teacher)} (teacher diagnostic)\n"
              f"{_teacher_verdict(student, teacher)}")
    else:
        print(f"\n{args.split} {_headline(student)}")
    for name, result in results.items():
        print(to_json({"split": args.split, "model": name, "unit": "percent", **result.metrics}))
    print("wrote " + ", ".join(str(f) for f in written))


def _teacher_verdict(student: EvalResult, teacher: EvalResult) -> str:
    """What the teacher diagnostic's AP against the student's means."""
    if teacher_ahead(student.metrics[student.headline], teacher.metrics[teacher.headline]):
        return ("The teacher is above the student: its features serve the detection head better than the student's "
                "own, so it has something to teach. It is a diagnostic, not a model to deploy: it needs the labels.")
    return ("The teacher is not above the student: its features serve the detection head no better than the "
            "student's own. That is a warning, not proof that distilling cannot help (in BENCHMARKS.md Faster R-CNN "
            "gained +6.43 AP with its teacher 19 AP below). It is a diagnostic, not a model to deploy: it needs the "
            "labels.")


def cmd_export(args: argparse.Namespace) -> None:
    from lgd.data.build import build_dataset
    from lgd.detectors import VIEWS
    from lgd.engine.checkpoint import load_trained_model
    from lgd.export import export_onnx, export_student

    cfg = _load(args)
    model, categories, _ = load_trained_model(cfg, args.weights)
    student = model.student
    out = Path(args.out or Path(cfg.output_dir) / f"student.{args.format}")
    meta = (categories["names"], categories["ids"], VIEWS[cfg.model.arch].label_offset)
    if args.format == "pth":
        export_student(student, cfg.model, *meta, out)
        print(f"exported the student ({type(student).__name__}: weights and the metadata that rebuilds it, "
              f"no LGD modules) to {out}")
        return
    # the ONNX graph is checked against PyTorch on images of the training split; two of different shapes (where the
    # split has them) show that the graph follows the input size
    dataset = build_dataset(cfg, "train", train=False)
    picks = sorted({0, len(dataset) // 2, len(dataset) - 1})
    images = [dataset[i][0].as_subclass(torch.Tensor) for i in picks]
    parity = export_onnx(student, cfg.model, *meta, images, out)
    print(f"exported the student ({type(student).__name__}) as ONNX to {out}\n"
          f"checked with onnxruntime against PyTorch on {parity}")


def cmd_predict(args: argparse.Namespace) -> int:
    from lgd.export import load_student
    from lgd.predict import Slicing, predict
    from lgd.utils.env import resolve_device

    model, meta = load_student(Path(args.model))
    device = resolve_device(args.device)
    model.to(device)
    out = Path(args.out)
    if args.tile is None and (args.overlap is not None or args.merge_thresh is not None):
        print("lgd: error: --overlap and --merge-thresh shape the tiles of --tile SIZE; give --tile too",
              file=sys.stderr)
        return 2
    given = {k: v for k, v in (("overlap", args.overlap), ("match_thresh", args.merge_thresh)) if v is not None}
    slicing = None if args.tile is None else Slicing(args.tile, **given)
    result = predict(model, meta, Path(args.input), out, args.score_thresh, device, progress=_progress(args),
                     max_detections=args.max_detections, slicing=slicing)
    for note in result.limited:
        print(f"lgd: {note}", file=sys.stderr)
    if result.hidden:
        print(f"left out {len(result.hidden)} hidden files (e.g. {result.hidden[0].name})", file=sys.stderr)
    for reason in result.skipped:
        print(f"lgd: skipped {reason}", file=sys.stderr)
    print(f"{count(len(result.records), 'image')}, {count(result.detections, 'detection')} -> {out}"
          + (f"; {count(len(result.skipped), 'image')} skipped (see above)" if result.skipped else ""))
    return 1 if result.skipped else 0


def cmd_summary(args: argparse.Namespace) -> None:
    from lgd.data.build import split_paths
    from lgd.engine.summary import parameter_counts
    from lgd.evaluation import read_categories

    cfg = _load(args)
    k = args.num_classes
    if k is None:
        k = len(read_categories(split_paths(cfg, "train")[1])["ids"])
    print(to_json(parameter_counts(cfg, k), indent=2))


def cmd_config(args: argparse.Namespace) -> None:
    from lgd.config import describe, dump_config

    if args.config or args.overrides:
        cfg = _load(args)
        scaled = f"# scaled with solver.max_iter: {cfg.scaled}\n" if cfg.scaled else ""
        print(f"# resolved from: {cfg.source}\n{scaled}{dump_config(cfg)}", end="")
    else:
        print(describe())


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "convert":
        from lgd.config import load_config
        from lgd.data.formats import convert, describe, write_coco

        cfg = load_config(None, [f"data.class_map={args.class_map}"])
        root, data = convert(args.fmt, Path(args.root), args.ann, args.names, args.box, cfg.data.class_map)
        out = Path(args.out)
        write_coco(data, out)
        print(f"wrote {describe(data)} to {out}\ntrain with: data.train.root={root.absolute()} "
              f"data.train.ann={out.absolute()}\n(a validation or test split: the same values as data.val.* or "
              f"data.test.*)")
    elif args.data_command == "tile":
        from lgd.data.tiling import tile_dataset

        report = tile_dataset(Path(args.root), Path(args.ann), Path(args.out), args.size, args.overlap,
                              args.min_fraction, progress=_progress(args))
        print(f"wrote {report.text()}\ntrain with: data.train.root={report.root.absolute()} "
              f"data.train.ann={report.annotations.absolute()}")
    elif args.data_command == "stats":
        from lgd.data import CocoDetection
        from lgd.data.build import split_paths
        from lgd.data.stats import dataset_stats, plot_stats

        cfg = _load(args)
        stats = dataset_stats(CocoDetection(*split_paths(cfg, args.split, _progress(args))))
        out = plot_stats(stats, Path(args.out or Path(cfg.output_dir) / f"stats_{args.split}.png"), args.split)
        print(f"{args.split}: {stats.text()}\nplot: {out}")
    else:
        from lgd.data.synthetic import write_synthetic

        out = write_synthetic(Path(args.out), seed=args.seed, num_train=args.train, num_val=args.val,
                              num_test=args.test, size=args.size, progress=_progress(args))
        print(f"wrote the synthetic dataset to {out}")


def cmd_visualize(args: argparse.Namespace) -> None:
    from lgd.engine.checkpoint import load_trained
    from lgd.feature_maps import find_image, visualize_features
    from lgd.utils.env import resolve_device

    cfg = _load(args)
    device = resolve_device(cfg.device)
    model, dataset = load_trained(cfg, args.split, Path(args.weights) if args.weights else None)
    index = find_image(dataset, args.image)
    out = Path(args.out or Path(cfg.output_dir) / f"feature_maps_{args.split}_{dataset.ids[index]}.png")
    print(f"wrote {visualize_features(model.to(device), dataset, index, cfg, device, out, args.fgfi_mask)}")


COMMANDS = {
    "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
    "summary": cmd_summary, "config": cmd_config, "data": cmd_data, "visualize": cmd_visualize,
}


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for the user: the library's source line tells them nothing."""
    return f"lgd: warning: {message}\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    # Training outlives its reader (`2>&1 | tee log` and Ctrl-C to the process group): a closed pipe must not cost
    # the checkpoint or the exit status, only the lines. Other commands stop quietly, as `| head` expects.
    with outliving_reader() if args.command == "train" else nullcontext():
        try:
            status = COMMANDS[args.command](args)
        except LGDError as e:
            print(f"lgd: error: {user_message(e)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into `head` and the like
            return 0
        except KeyboardInterrupt:
            print("\nlgd: interrupted. The last checkpoint is intact; continue with the same command and --resume.",
                  file=sys.stderr)
            return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
