"""Pretrain torchvision's ResNet-18 for the pretrained regime, without downloading anything.

    python benchmarks/pretrain_backbone.py            # the recipe's file in $LGD_CACHE/regime (or ~/.cache/lgd/regime)
    python benchmarks/pretrain_backbone.py --quick    # a few steps on tiny crops (for the tests)
    python benchmarks/pretrain_backbone.py --link datasets/regime   # + regime_data.py's target dataset; links both
                                                                    #   where configs/regime_*_lgd.yaml look for them

The task is 16-way classification of synthetic crops (regime_data.PRETRAIN_CLASSES: 10 shape families on procedural
backgrounds, 6 texture families), a domain that shares no class, fill or background with the detection target
(regime_data.py). Every batch is drawn fresh from a stream keyed by (seed, step), so no image is seen twice and an
interrupted run resumes exactly from its partial checkpoint (written every ``CHECKPOINT_EVERY`` steps). One thread,
CPU, ``torch.manual_seed(recipe.seed)``: the same recipe gives the same bytes on the same torch build and CPU; on
another CPU the kernels round differently and the bytes differ (three 2-core AMD EPYC VMs gave three bodies,
BENCHMARKS.md), which is why accuracy.py stamps every run folder with its body's SHA-256.

What is written, in the cache folder, named by the recipe's digest (``resnet18-pretrain-<digest>``):
- ``.pth``: a plain state dict of tensors (``torch.load(path, weights_only=True)`` opens it): every tensor of
  ``torchvision.models.resnet18()`` except the classifier ``fc.*``, so ``model.backbone_weights=FILE`` loads the whole
  body (BatchNorm statistics included, which ``model.norm=frozen_bn`` keeps fixed);
- ``.json``: the manifest: the recipe, the file's SHA-256, the cost (wall-clock and CPU seconds, summed over resumed
  sessions) and the quality checks (held-out accuracy; a linear probe on target-object crops against a randomly
  initialised ResNet-18);
- ``.log``: one progress line per ``LOG_EVERY`` steps, written as it goes.

The file is reused while its manifest has the same recipe and its SHA-256 matches; otherwise it is trained again.
Inputs are normalised exactly as torchvision's detection transform normalises them (ImageNet mean and std on [0, 1]
pixels), so the features the detector sees are the ones learnt here.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lgd, not an installed one
sys.path.insert(0, str(Path(__file__).parent))
from lgd.utils.atomic import atomic_write, atomic_write_text  # noqa: E402
from lgd.utils.files import file_digest  # noqa: E402
from regime_data import (  # noqa: E402
    GENERATOR_VERSION, PRETRAIN_CLASSES, SPLITS, TARGET_CLASSES, TARGET_DEFAULTS, ensure_target_dataset, pretrain_batch,
    regime_cache_dir, render_pretrain_crop, target_object_crops,
)

CHECKPOINT_EVERY = 100
LOG_EVERY = 25
# torchvision's GeneralizedRCNNTransform defaults, used by every lgd detector
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights; its digest names the cached file."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 64
    image_size: int = 56  # px, square crops
    base_lr: float = 0.1
    warmup_steps: int = 50
    momentum: float = 0.9
    weight_decay: float = 5e-4
    heldout: int = 1024  # held-out crops for the accuracy check
    probe_images: int = 400  # target images whose object crops feed the linear probe (about 4.5 objects each)
    generator_version: int = GENERATOR_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


RECIPE = Recipe()
QUICK = Recipe(steps=3, batch_size=4, image_size=32, warmup_steps=1, heldout=8, probe_images=4)


def _serialise(state: dict[str, Tensor]) -> bytes:
    """``torch.save`` bytes that depend on the tensors only: saved to a path, the archive's inner folder would be
    named after the (random) temporary file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _to_input(pixels: np.ndarray) -> Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32, normalised as torchvision's detectors normalise."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MEAN) / STD


def _lr(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``recipe.steps``."""
    if step < recipe.warmup_steps:
        return recipe.base_lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def paths(cache_dir: Path, recipe: Recipe) -> dict[str, Path]:
    """The files of ``recipe`` in ``cache_dir``: weights, manifest, log, partial (the resumable checkpoint)."""
    stem = f"resnet18-pretrain-{recipe.digest()}"
    return {"weights": cache_dir / f"{stem}.pth", "manifest": cache_dir / f"{stem}.json",
            "log": cache_dir / f"{stem}.log", "partial": cache_dir / f".{stem}.partial.pth"}


def cached(cache_dir: Path, recipe: Recipe) -> Optional[dict]:
    """The manifest when the cache holds this recipe's file intact, else None (a stale or corrupt file is named)."""
    p = paths(cache_dir, recipe)
    if not (p["weights"].is_file() and p["manifest"].is_file()):
        return None
    try:
        manifest = json.loads(p["manifest"].read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{p['manifest']} is not valid JSON; pretraining again")
        return None
    if manifest.get("recipe") != asdict(recipe):
        warnings.warn(f"{p['manifest']} was written for another recipe; pretraining again")
        return None
    if manifest.get("sha256") != file_digest(p["weights"]):
        warnings.warn(f"{p['weights']} does not match the SHA-256 in its manifest; pretraining again")
        return None
    return manifest


def ensure_pretrained(cache_dir: Optional[Path] = None, recipe: Recipe = RECIPE, progress: bool = True) -> Path:
    """The weights file of ``recipe``, pretrained first unless the cache already holds it intact.

    ``cache_dir`` defaults to ``regime_data.regime_cache_dir()``. The manifest beside it has the cost and checks.
    """
    cache_dir = Path(cache_dir) if cache_dir else regime_cache_dir()
    if cached(cache_dir, recipe) is None:
        pretrain(cache_dir, recipe, progress)
    return paths(cache_dir, recipe)["weights"]


def _log(path: Path, text: str, progress: bool) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    if progress:
        print(text, flush=True)


def pretrain(cache_dir: Path, recipe: Recipe = RECIPE, progress: bool = True) -> dict:
    """Train, check and write the weights and manifest of ``recipe``; resumes from a partial checkpoint of the same
    recipe. Returns the manifest."""
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.image_size < 32:
        raise ValueError(f"the recipe needs steps >= 1, batch_size >= 1 and image_size >= 32 px; got {recipe}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    p = paths(cache_dir, recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the result then does not depend on the machine's core count
    try:
        torch.manual_seed(recipe.seed)
        model = torchvision.models.resnet18(num_classes=len(PRETRAIN_CLASSES))
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.base_lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        start, spent = 0, {"wall_s": 0.0, "cpu_s": 0.0}
        if p["partial"].is_file():
            state = torch.load(p["partial"], map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, spent = int(state["step"]), {k: float(state[k]) for k in spent}
            _log(p["log"], f"resuming at step {start}", progress)
        else:
            p["log"].write_text(f"pretraining {p['weights'].name}: {json.dumps(asdict(recipe))}\n")
        wall, cpu = time.perf_counter(), time.process_time()
        model.train()
        correct = seen = 0
        for step in range(start, recipe.steps):
            pixels, labels = pretrain_batch(np.random.default_rng([recipe.seed, 7, 0, step]), recipe.batch_size,
                                            recipe.image_size)
            for group in optimizer.param_groups:
                group["lr"] = _lr(recipe, step)
            logits = model(_to_input(pixels))
            target = torch.from_numpy(labels)
            loss = nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == target).sum())
            seen += len(labels)
            done = step + 1
            if done % LOG_EVERY == 0 or done == recipe.steps:
                elapsed = spent["wall_s"] + time.perf_counter() - wall
                _log(p["log"], f"step {done}/{recipe.steps} loss {loss.item():.3f} train acc {correct / seen:.3f} "
                               f"lr {_lr(recipe, step):.4f} wall {elapsed:.0f}s cpu "
                               f"{spent['cpu_s'] + time.process_time() - cpu:.0f}s", progress)
                correct = seen = 0
            if done % CHECKPOINT_EVERY == 0 and done < recipe.steps:
                now = {"wall_s": spent["wall_s"] + time.perf_counter() - wall,
                       "cpu_s": spent["cpu_s"] + time.process_time() - cpu}
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done, **now}
                atomic_write(p["partial"], lambda tmp: torch.save(state, tmp))
        cost = {"wall_s": round(spent["wall_s"] + time.perf_counter() - wall, 1),
                "cpu_s": round(spent["cpu_s"] + time.process_time() - cpu, 1)}
        body = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
        atomic_write(p["weights"], lambda tmp: Path(tmp).write_bytes(_serialise(body)))
        check_loads(p["weights"])
        checks = {"heldout_accuracy": heldout_accuracy(model, recipe), "linear_probe": linear_probe(body, recipe)}
        manifest = {"file": p["weights"].name, "sha256": file_digest(p["weights"]), "recipe": asdict(recipe),
                    "classes": list(PRETRAIN_CLASSES), "cost": cost, "checks": checks,
                    "torch": torch.__version__, "torchvision": torchvision.__version__,
                    "machine": f"{platform.machine()}, {platform.system()}, 1 thread",
                    "date": time.strftime("%Y-%m-%d")}
        atomic_write_text(p["manifest"], json.dumps(manifest, indent=1))
        p["partial"].unlink(missing_ok=True)
        _log(p["log"], f"done: {json.dumps({'cost': cost, 'checks': checks})}", progress)
        return manifest
    finally:
        torch.set_num_threads(threads)


def check_loads(weights: Path) -> None:
    """Fail unless ``weights`` opens with ``weights_only=True`` and fills every tensor of a ResNet-18 body (all but
    ``fc``) with the right shape, for ``frozen_bn`` (what the regime's configs use) as for ``bn``.

    Raises:
        ValueError: naming the first missing or misshapen tensor.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for norm in (torchvision.ops.FrozenBatchNorm2d, nn.BatchNorm2d):
        own = torchvision.models.resnet18(norm_layer=norm).state_dict()
        for key, tensor in own.items():
            if key.startswith("fc."):
                continue
            if key not in state or state[key].shape != tensor.shape:
                raise ValueError(f"{weights}: tensor {key} is missing or has another shape than resnet18's "
                                 f"{tuple(tensor.shape)} ({norm.__name__})")


@torch.no_grad()
def heldout_accuracy(model: nn.Module, recipe: Recipe) -> float:
    """Top-1 accuracy on ``recipe.heldout`` crops from a stream no training batch draws from."""
    model.eval()
    rng = np.random.default_rng([recipe.seed, 7, 1])
    samples = [render_pretrain_crop(rng, recipe.image_size) for _ in range(recipe.heldout)]
    pixels, labels = np.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])
    predictions = torch.cat([model(_to_input(pixels[i:i + 256])).argmax(1) for i in range(0, len(pixels), 256)])
    return round(float((predictions == labels).float().mean()), 4)


@torch.no_grad()
def _features(body: nn.Module, pixels: np.ndarray) -> Tensor:
    """Globally average-pooled layer3 and layer4 features, ``(N, 256 + 512)``."""
    body.eval()
    out = []
    for i in range(0, len(pixels), 256):
        x = body.maxpool(body.relu(body.bn1(body.conv1(_to_input(pixels[i:i + 256])))))
        c4 = body.layer3(body.layer2(body.layer1(x)))
        out.append(torch.cat([c4.mean((2, 3)), body.layer4(c4).mean((2, 3))], 1))
    return torch.cat(out)


def _ridge_accuracy(fit_x: Tensor, fit_y: Tensor, eval_x: Tensor, eval_y: Tensor, classes: int) -> float:
    """A ridge-regression classifier on standardised features (lambda fixed at 1 per fitted sample / 100, chosen
    before any probe ran and the same for every backbone): accuracy on the evaluation crops."""
    mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
    a = torch.cat([(fit_x - mean) / std, torch.ones(len(fit_x), 1)], 1).double()
    b = torch.cat([(eval_x - mean) / std, torch.ones(len(eval_x), 1)], 1).double()
    y = nn.functional.one_hot(fit_y, classes).double()
    w = torch.linalg.solve(a.T @ a + 0.01 * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return round(float(((b @ w).argmax(1) == eval_y).float().mean()), 4)


def linear_probe(body_state: dict[str, Tensor], recipe: Recipe) -> dict:
    """How linearly separable the target's classes are in the pretrained features, against the same ResNet-18 at
    its random initialisation (seeded alike): crops around the objects of ``recipe.probe_images`` fresh target images
    (a stream of their own, never the dataset's splits), the first 60% of images fit, the rest evaluate."""
    target = {k: TARGET_DEFAULTS[k] for k in ("min_px", "max_px", "max_objects")}
    size = TARGET_DEFAULTS["size"]
    fit_images = max(1, int(0.6 * recipe.probe_images))
    rng = np.random.default_rng([recipe.seed, 7, 2])
    fit_pixels, fit_y = target_object_crops(rng, fit_images, size, recipe.image_size, **target)
    eval_pixels, eval_y = target_object_crops(rng, recipe.probe_images - fit_images or 1, size, recipe.image_size,
                                              **target)
    result = {"fit_crops": len(fit_y), "eval_crops": len(eval_y), "classes": len(TARGET_CLASSES)}
    for name in ("pretrained", "random_init"):
        torch.manual_seed(recipe.seed)
        body = torchvision.models.resnet18()
        if name == "pretrained":
            body.load_state_dict(body_state, strict=False)
        result[name] = _ridge_accuracy(_features(body, fit_pixels), torch.from_numpy(fit_y),
                                       _features(body, eval_pixels), torch.from_numpy(eval_y), len(TARGET_CLASSES))
    return result


def link(dataset: Path, weights: Path, where: Path) -> None:
    """Make ``where`` the folder ``configs/regime_*_lgd.yaml`` read: links to the dataset's splits and annotations and
    to the weights file as ``resnet18_pretrained.pth``; links already there are replaced."""
    where.mkdir(parents=True, exist_ok=True)
    for name, source in [(s, dataset / s) for s in SPLITS + ("annotations",)] + [("resnet18_pretrained.pth", weights)]:
        path = where / name
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            raise FileExistsError(f"{path} exists and is not a link; move it away or link elsewhere")
        path.symlink_to(source.resolve())


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="default: $LGD_CACHE/regime or ~/.cache/lgd/regime")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny crops (for the tests)")
    parser.add_argument("--steps", type=int, help="override the recipe's steps (another recipe, another file)")
    parser.add_argument("--link", type=Path, metavar="DIR",
                        help="also make regime_data.py's target dataset (cached) and link both into DIR (the configs "
                             "use datasets/regime)")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else RECIPE
    if args.steps:
        recipe = replace(recipe, steps=args.steps)
    cache_dir = regime_cache_dir(args.cache_dir)
    weights = ensure_pretrained(cache_dir, recipe)
    manifest = json.loads(paths(cache_dir, recipe)["manifest"].read_text())
    print(f"{weights}\nsha256 {manifest['sha256']}\ncost {manifest['cost']}\nchecks {manifest['checks']}")
    if args.link:
        dataset = ensure_target_dataset(cache_dir)
        link(dataset, weights, args.link)
        print(f"target dataset: {dataset}\nlinked into {args.link}")
    return manifest


if __name__ == "__main__":
    main()
