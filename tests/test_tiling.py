"""Large images: `lgd data tile` (tiles with clipped boxes as a COCO split) and sliced `lgd predict --tile`."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from lgd.cli import build_parser, main
from lgd.config import ModelConfig, load_config
from lgd.data import CocoDetection
from lgd.data.tiling import tile_grid
from lgd.detectors import build_detector
from lgd.errors import LGDError
from lgd.export import export_student
from lgd.predict import Slicing, detection_limit, merge_tiles, predict


def test_the_grid_shifts_the_last_row_and_column_to_end_at_the_border():
    # the image: 1249 x 1035 px in tiles of 400 px overlapping by 80 px (SAHI's get_slice_bboxes)
    grid = tile_grid(1249, 1035, 400, 0.2)
    assert sorted({x1 for x1, _, _, _ in grid}) == [0, 320, 640, 849]
    assert sorted({y1 for _, y1, _, _ in grid}) == [0, 320, 635]
    assert all(x2 - x1 == 400 and y2 - y1 == 400 for x1, y1, x2, y2 in grid)
    assert max(x2 for _, _, x2, _ in grid) == 1249 and max(y2 for _, _, _, y2 in grid) == 1035
    assert tile_grid(300, 200, 400, 0.2) == [(0, 0, 300, 200)]  # an image smaller than a tile is one tile
    assert tile_grid(720, 400, 400, 0.2) == [(0, 0, 400, 400), (320, 0, 720, 400)]
    for size, overlap in ((0, 0.2), (400, 1.0), (400, -0.1)):
        with pytest.raises(LGDError, match="tile"):
            tile_grid(1000, 1000, size, overlap)


def _coco_split(folder: Path, pixels: np.ndarray, anns: list[tuple[list[float], int]]) -> Path:
    Image.fromarray(pixels).save(folder / "big.png")
    ann_file = folder / "ann.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "big.png", "width": pixels.shape[1], "height": pixels.shape[0]}],
        "annotations": [{"id": i, "image_id": 7, "category_id": 3, "bbox": box, "iscrowd": crowd}
                        for i, (box, crowd) in enumerate(anns, 1)],
        "categories": [{"id": 3, "name": "tree"}],
    }))
    return ann_file


def test_data_tile_clips_boxes_to_tiles_drops_small_parts_and_writes_a_split_that_loads(tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    ann = _coco_split(tmp_path, pixels, [
        ([5, 5, 20, 20], 0),    # inside the first tile only
        ([30, 10, 20, 20], 0),  # whole in the first tile, half in the second: kept there, clipped
        ([55, 30, 20, 10], 0),  # a quarter in the first tile (dropped there), whole in the second
        ([85, 40, 10, 10], 1),  # an ignore region, in the second tile
    ])
    out = tmp_path / "tiles"
    # tiles of 60 px overlapping by 12: x 0..60 and 40..100
    assert main(["data", "tile", "--root", str(tmp_path), "--ann", str(ann), "--size", "60", "--overlap", "0.2",
                 "--min-fraction", "0.5", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 tiles of 1 image" in printed
    assert "4 boxes kept (1 clipped at a tile edge), 1 dropped" in printed and "1 ignore region" in printed
    assert f"data.train.root={(out / 'images').absolute()} data.train.ann={(out / 'annotations.json').absolute()}" \
        in printed

    coco = COCO(str(out / "annotations.json"))
    first, second = (coco.imgs[i] for i in sorted(coco.imgs))
    assert (first["tile_xyxy"], second["tile_xyxy"]) == ([0, 0, 60, 60], [40, 0, 100, 60])
    assert second["source_file_name"] == "big.png" and second["source_image_id"] == 7
    assert [(a["bbox"], a["iscrowd"]) for a in coco.imgToAnns[second["id"]]] == [
        ([0.0, 10.0, 10.0, 20.0], 0), ([15.0, 30.0, 20.0, 10.0], 0), ([45.0, 40.0, 10.0, 10.0], 1)]
    assert [a["bbox"] for a in coco.imgToAnns[first["id"]]] == [[5.0, 5.0, 20.0, 20.0], [30.0, 10.0, 20.0, 20.0]]

    dataset = CocoDetection(out / "images", out / "annotations.json")
    image, target = dataset[1]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(pixels[:, 40:100]).permute(2, 0, 1))
    assert target["boxes"].tolist() == [[0, 10, 10, 30], [15, 30, 35, 40]]  # the ignore region is no target


def test_data_tile_reports_a_bad_option_and_a_bad_record_by_name(tmp_path, capsys):
    ann = _coco_split(tmp_path, np.zeros((20, 20, 3), dtype=np.uint8), [([1, 1, 5, 5], 0)])
    assert main(["data", "tile", "--root", str(tmp_path), "--ann", str(ann), "--min-fraction", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "minimum kept fraction" in capsys.readouterr().err
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = 30
    ann.write_text(json.dumps(data))
    assert main(["data", "tile", "--root", str(tmp_path), "--ann", str(ann), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{ann}, image id 7: image file {tmp_path / 'big.png'} is 20x20 pixels but its record says width=30" in err


class _BlobDetector(torch.nn.Module):
    """Stands in for a detector: one box around the pixels of each distinct non-zero red value, scored by that
    value; keeps its best ``detections_per_img`` and records the size of every image it is given."""

    def __init__(self, detections_per_img: int = 100) -> None:
        super().__init__()
        self.detections_per_img = detections_per_img
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            self.seen.append(tuple(image.shape))
            values = [v for v in image[0].unique().tolist() if v > 0]
            boxes = []
            for v in values:
                ys, xs = torch.where(image[0] == v)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            scores = torch.tensor(values, dtype=torch.float32)
            order = scores.argsort(descending=True)[:self.detections_per_img]
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)[order],
                        "scores": scores[order], "labels": torch.zeros(len(order), dtype=torch.int64)})
        return out


META = {"label_offset": 0, "class_names": ["tree"], "category_ids": [1]}


def _blobs(path: Path, blobs: list[tuple[int, int, int, int, int]], size: tuple[int, int] = (160, 100)) -> None:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for x1, y1, x2, y2, value in blobs:
        pixels[y1:y2, x1:x2, 0] = value
    Image.fromarray(pixels).save(path)


def test_sliced_prediction_finds_an_object_crossing_a_tile_edge_once(tmp_path):
    # 160 x 100 px in tiles of 64 overlapping by 16: x 0..64, 48..112, 96..160; y 0..64, 36..100. The first
    # tile sees 8 of the 20 px of the object at x 56..76, the second sees it whole: IoU 0.4, one object.
    _blobs(tmp_path / "big.png", [(56, 10, 76, 24, 230), (120, 70, 140, 90, 200)])
    model = _BlobDetector()
    result = predict(model, META, tmp_path / "big.png", tmp_path / "out", 0.3, torch.device("cpu"), progress=False,
                     slicing=Slicing(64, 0.25))
    assert set(model.seen) == {(3, 64, 64)} and len(model.seen) == 6  # each tile at its own resolution
    found = [(d["box_xyxy"], d["score"]) for d in result.records[0]["detections"]]
    assert found == [([56.0, 10.0, 76.0, 24.0], round(230 / 255, 4)), ([120.0, 70.0, 140.0, 90.0], round(200 / 255, 4))]
    assert not result.limited

    whole = predict(_BlobDetector(), META, tmp_path / "big.png", tmp_path / "out2", 0.3, torch.device("cpu"),
                    progress=False)
    assert [d["box_xyxy"] for d in whole.records[0]["detections"]] == [b for b, _ in found]


def test_the_merge_grows_a_cut_box_to_the_whole_object_and_keeps_one_tile_s_and_other_classes():
    # box 0: an object cut by its tile's edge at x=20, scoring best; box 2: the same object whole in the next tile;
    # box 1 lies inside box 0 but comes from the same tile (the detector's own NMS kept both); box 3: another class
    boxes = torch.tensor([[8, 0, 20, 10], [10, 2, 18, 8], [8, 0, 30, 10], [8, 0, 30, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    tiles = torch.tensor([0, 0, 1, 1])
    grid = torch.tensor([[0, 0, 20, 20], [5, 0, 40, 20]], dtype=torch.float32)
    keep, merged = merge_tiles(boxes, scores, labels, tiles, grid, 0.5)
    assert keep.tolist() == [0, 1, 3]
    assert merged.tolist() == [[8, 0, 30, 10], [10, 2, 18, 8], [8, 0, 30, 10]]
    keep, _ = merge_tiles(boxes, scores, labels, tiles, grid, 1.0)  # nothing covers more than all of a box
    assert keep.tolist() == [0, 1, 2, 3]


def test_predict_reports_the_per_image_limit_and_max_detections_raises_it(tmp_path):
    _blobs(tmp_path / "three.png", [(2, 2, 10, 10, 250), (20, 2, 30, 10, 240), (40, 2, 50, 10, 230)])
    model = _BlobDetector(detections_per_img=2)
    result = predict(model, META, tmp_path / "three.png", tmp_path / "out", 0.3, torch.device("cpu"), progress=False)
    assert len(result.records[0]["detections"]) == 2
    assert result.limited == [f"{tmp_path / 'three.png'}: 2 detections; the limit is 2 per image (--max-detections): "
                              f"raise it to see more"]
    result = predict(model, META, tmp_path / "three.png", tmp_path / "out", 0.3, torch.device("cpu"), progress=False,
                     max_detections=5)
    assert len(result.records[0]["detections"]) == 3 and not result.limited
    assert detection_limit(model) == 2  # the model's own limit is back after the run
    # sliced: each tile finds one or two blobs, the merged image three; a cap of 2 cuts the image's
    result = predict(model, META, tmp_path / "three.png", tmp_path / "out", 0.3, torch.device("cpu"), progress=False,
                     max_detections=2, slicing=Slicing(32, 0.25))
    assert [d["score"] for d in result.records[0]["detections"]] == [round(250 / 255, 4), round(240 / 255, 4)]
    assert len(result.limited) == 1
    with pytest.raises(LGDError, match="at least 1"):
        predict(model, META, tmp_path / "three.png", tmp_path / "out", 0.3, torch.device("cpu"), max_detections=0)


def test_lgd_predict_prints_the_limit_and_takes_max_detections_and_tiles(tmp_path, capsys):
    torch.manual_seed(0)
    # a random detector that returns every candidate (score_thresh 0), so the limit is what bounds its output
    cfg = ModelConfig(arch="retinanet", depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=128,
                      score_thresh=0.0)
    export_student(build_detector(cfg, 2).eval(), cfg, ["tree", "shrub"], [1, 2], 0, tmp_path / "student.pth")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    base = ["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "student.pth"), "--score-thresh", "0",
            "--no-progress"]

    def run(*options: str) -> tuple[int, str]:
        assert main([*base, "--out", str(tmp_path / "out"), *options]) == 0
        return len(json.loads((tmp_path / "out" / "detections.json").read_text())[0]["detections"]), \
            capsys.readouterr().err

    n, err = run()
    assert n == 100 and "a.png: 100 detections; the limit is 100 per image (--max-detections)" in err
    n, err = run("--max-detections", "1000")  # the cut detections come back; no limit is reached
    assert n > 100 and "limit" not in err
    n, err = run("--tile", "64", "--overlap", "0.2", "--max-detections", "40")
    assert n == 40 and "the limit is 40 per image" in err
    assert main([*base, "--out", str(tmp_path / "o"), "--tile", "64", "--overlap", "1"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--overlap", "0.3"]) == 2  # tiles' shape without tiles
    assert "give --tile too" in capsys.readouterr().err


def test_the_readme_s_large_image_commands_are_valid():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Large images")[1].split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("lgd ")]
    assert [c[1] for c in commands] == ["data", "data", "data", "data", "train", "export", "predict"]
    for argv in commands:
        args = build_parser().parse_args(argv[1:])
        if args.command == "train":  # the overrides name config keys that exist, with values of their type
            load_config(Path(__file__).parents[1] / args.config, args.overrides)
    assert args.tile == 400 and args.overlap == 0.2 and args.max_detections == 1000


def _greedy_merge(boxes, scores, labels, tiles, thresh):
    """The merge as its docstring says it, pair by pair: the reference for merge_tiles."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    taken, kept = set(), []
    for n, i in enumerate(order):
        if i in taken:
            continue
        box = boxes[i].clone()
        for j in order[n + 1:]:
            if j in taken or labels[j] != labels[i] or tiles[j] == tiles[i]:
                continue
            wh = (torch.minimum(boxes[i, 2:], boxes[j, 2:]) - torch.maximum(boxes[i, :2], boxes[j, :2])).clamp(min=0)
            smaller = min(float((boxes[k, 2:] - boxes[k, :2]).prod()) for k in (i, j))
            if float(wh.prod()) / smaller > thresh:
                taken.add(j)
                box = torch.cat([torch.minimum(box[:2], boxes[j, :2]), torch.maximum(box[2:], boxes[j, 2:])])
        kept.append((i, box.tolist()))
    return kept


def test_the_merge_is_the_greedy_merge_on_a_grid_of_tiles():
    grid = torch.tensor(tile_grid(100, 80, 40, 0.25), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, len(grid), (300,), generator=g)
    # boxes inside their tile, many of them in overlaps, two classes
    x1y1 = grid[tiles, :2] + torch.rand(300, 2, generator=g) * 30
    boxes = torch.cat([x1y1, torch.minimum(x1y1 + 2 + torch.rand(300, 2, generator=g) * 12, grid[tiles, 2:])], dim=1)
    scores, labels = torch.rand(300, generator=g), torch.randint(0, 2, (300,), generator=g)
    keep, merged = merge_tiles(boxes, scores, labels, tiles, grid, 0.5)
    expected = _greedy_merge(boxes, scores, labels, tiles, 0.5)
    assert keep.tolist() == [i for i, _ in expected] and len(keep) < 300
    assert torch.allclose(merged, torch.tensor([b for _, b in expected]))


def test_max_detections_raises_an_r_cnn_s_proposals_too_for_the_run_only(tmp_path):
    cfg = ModelConfig(arch="fasterrcnn", depth=18, fpn_channels=32, norm="bn", min_size=[64], max_size=128,
                      rpn_proposals_test=50)
    model = build_detector(cfg, 1).eval()
    seen = []
    model.rpn.register_forward_pre_hook(lambda rpn, _: seen.append((rpn.pre_nms_top_n(), rpn.post_nms_top_n())))
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    predict(model, {**META, "label_offset": 1}, tmp_path / "a.png", tmp_path / "out", 0.3, torch.device("cpu"),
            progress=False, max_detections=300)
    assert seen == [(300, 300)]
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n(), detection_limit(model)) == (50, 50, 100)
