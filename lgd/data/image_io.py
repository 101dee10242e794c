"""The one image reader: training, evaluation, ``lgd predict``, ``lgd visualize`` and the converters read through it.

What is read how:

- **Orientation.** The EXIF Orientation tag is applied to pixels (``ImageOps.exif_transpose``) and to sizes,
  so images and their boxes are in the frame a viewer shows — the frame labelling tools (and detectron2's
  reader) use. A file stored 160x96 with Orientation 6 is a 96x160 image.
- **8-bit modes** (1, L, P, RGB, RGBA, CMYK, YCbCr, LAB, HSV, LA, PA) become RGB by Pillow's own conversion;
  alpha is dropped. Pillow already reduces 16-bit-per-channel colour PNG / TIFF / PPM to 8 bits on opening.
- **High bit depth greyscale** is scaled by the range of its stored samples: 16-bit (``I;16*``) by 65535,
  32-bit integer (``I``) by the range the file declares (an unsigned TIFF's bits per sample; 65535 for
  PGM, which Pillow scales to 16 bits), float (``F``) is taken as [0, 1]. Grey repeats over 3 channels.
- **Refused**, with a message naming the file and the mode: signed integers (no brightness range), float
  values outside [0, 1] or not finite, 32-bit integers of a format that declares no range, and modes
  Pillow cannot convert. Files Pillow cannot open or decode (empty, truncated, not an image, over Pillow's
  decompression-bomb limit) are reported by name with the reason and, where there is one, the fix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from lgd.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# EXIF orientations 5-8 transpose the image (swap width and height); 2-4 only mirror or turn it by 180 degrees.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def describe(path: Path, where: str = "") -> str:
    """"WHERE: image file PATH": how messages name an image and the record that refers to it."""
    return (f"{where}: " if where else "") + f"image file {path}"


def read_image(path: Path, where: str = "") -> torch.Tensor:
    """The image at ``path`` as a float32 (3, H, W) RGB tensor in [0, 1], EXIF orientation applied.

    ``where`` names what refers to the file (e.g. "ann.json, image id 7") for messages. See the module
    docstring for how each Pillow mode is scaled.

    Raises:
        DatasetError: the file is missing, cannot be opened or decoded, or holds pixels of a mode or
            range that has no meaning as an RGB image; the message names file, ``where`` and mode.
    """
    path = Path(path)
    with _opened(path, where) as img:
        peak = _integer_peak(img, path, where)
        shown = ImageOps.exif_transpose(img)  # a loaded copy: usable once the file is closed
    return _to_tensor(shown, peak, path, where)


def read_image_size(path: Path, where: str = "") -> tuple[int, int]:
    """(width, height) of the image at ``path`` as displayed (EXIF orientation applied), from its header.

    Raises:
        DatasetError: the file is missing or cannot be opened; the message names file and ``where``.
    """
    path = Path(path)
    with _opened(path, where) as img:
        width, height = img.size
        swapped = exif_orientation(img) in TRANSPOSING_ORIENTATIONS
    return (height, width) if swapped else (width, height)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation (1..8) of an open image; 1 (as stored) when it has none."""
    return int(img.getexif().get(ExifTags.Base.Orientation, 1))


def stored_size_note(path: Path, width: int, height: int) -> str:
    """A hint for a size mismatch: that the file's EXIF orientation turns (``width``, ``height``) around.

    Empty unless the stored pixels are ``width`` x ``height`` and an orientation tag transposes them.
    """
    with _opened(Path(path), "") as img:
        orientation = exif_orientation(img)
        stored = img.size
    if orientation not in TRANSPOSING_ORIENTATIONS or stored != (width, height):
        return ""
    return (f"; the file stores {stored[0]}x{stored[1]} pixels with EXIF Orientation {orientation}, which lgd "
            f"applies (as labelling tools show the image), so its annotations must be in the displayed "
            f"{stored[1]}x{stored[0]} frame: re-label it in that frame, or save the pixels as displayed "
            f"without the tag (e.g. PIL.ImageOps.exif_transpose) and set width={stored[1]}, height={stored[0]}")


def find_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, hidden image files skipped) in ``folder``, each list sorted.

    Image files have an extension in ``IMAGE_EXTENSIONS`` (any case). Hidden files and folders (a name
    starting with "."), such as macOS's ``._name.jpg`` companions, are not images and are left out.
    """
    folder = Path(folder)
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images, hidden = [], []
    for path in candidates:
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        is_hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        (hidden if is_hidden else images).append(path)
    return sorted(images), sorted(hidden)


@contextlib.contextmanager
def _opened(path: Path, where: str) -> Iterator[Image.Image]:
    """``Image.open(path)``, with every way Pillow can fail turned into a DatasetError that names the file."""
    name = describe(path, where)
    try:
        with Image.open(path) as img:
            yield img
    except FileNotFoundError:
        raise DatasetError(f"{name} does not exist") from None
    except DatasetError:
        raise
    # Pillow's decoders raise many types on damaged files (OSError, SyntaxError, ValueError, struct.error,
    # EOFError, IndexError, DecompressionBombError, ...); each becomes a message, never a traceback.
    except Exception as exc:
        raise DatasetError(f"{name} cannot be read: {_reason(path, exc)}") from None


def _reason(path: Path, exc: Exception) -> str:
    if isinstance(exc, IsADirectoryError):
        return "it is a folder"
    if isinstance(exc, PermissionError):
        return "permission denied"
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes; an interrupted copy or download?): copy it again or remove it"
    if isinstance(exc, Image.DecompressionBombError):
        return f"Pillow refuses it as a possible decompression bomb ({exc}): downscale the image"
    if isinstance(exc, UnidentifiedImageError):
        return ("Pillow does not recognise it as an image (a damaged file, or a format or sample type Pillow "
                "cannot read): convert it to PNG or JPEG")
    if "truncated" in str(exc).lower():
        return f"the file is truncated ({exc}; an interrupted copy or download?): copy it again"
    return f"{type(exc).__name__}: {exc}"


def _integer_peak(img: Image.Image, path: Path, where: str) -> Optional[int]:
    """The brightest value of an open 32-bit integer (mode I) image's samples, from what its file declares.

    None for other modes.

    Raises:
        DatasetError: the file declares no range, or signed samples, which have none.
    """
    if img.mode != "I":
        return None
    if img.format == "PPM":  # Pillow scales PGM / PPM samples of any maxval above 255 to 16 bits
        return 65535
    if img.format == "TIFF":
        tags = img.tag_v2
        sample_format = tags.get(ExifTags.Base.SampleFormat, 1)
        bits = tags.get(ExifTags.Base.BitsPerSample, 32)
        sample_format = max(sample_format) if isinstance(sample_format, tuple) else sample_format
        bits = max(bits) if isinstance(bits, tuple) else bits
        if sample_format == 1:
            return 2**bits - 1
    raise DatasetError(
        f"{describe(path, where)} has mode I (32-bit integer pixels) and its {img.format} file declares no unsigned "
        f"range for them (signed samples have no brightness range): save it as 8-bit or 16-bit (I;16) PNG")


def _to_tensor(img: Image.Image, peak: Optional[int], path: Path, where: str) -> torch.Tensor:
    """Pixels of a decoded image as float32 (3, H, W) in [0, 1]; ``peak`` is mode I's brightest value."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float32) / 65535
    elif mode == "I":
        # Pillow holds every mode I sample as int32: unsigned 32-bit values above 2**31 come back negative.
        grey = (np.asarray(img).view(np.uint32).astype(np.float64) / peak).astype(np.float32)
    elif mode == "F":
        grey = np.array(img, dtype=np.float32)
        if not np.isfinite(grey).all() or grey.min(initial=0.0) < 0 or grey.max(initial=0.0) > 1:
            raise DatasetError(
                f"{describe(path, where)} has mode F (float pixels) with values from {np.nanmin(grey):g} to "
                f"{np.nanmax(grey):g}; float images are read as brightness in [0, 1]: rescale it to [0, 1], or "
                f"save it as 8-bit or 16-bit PNG")
    else:
        # Byte transparency in a palette image: Pillow asks for RGBA before RGB (and warns otherwise).
        source = img.convert("RGBA") if mode == "P" and "transparency" in img.info else img
        try:
            rgb = source.convert("RGB")
        except ValueError:
            raise DatasetError(f"{describe(path, where)} has mode {mode}, which Pillow cannot convert to RGB: "
                               f"save it as 8-bit RGB or greyscale") from None
        return F.to_dtype(F.pil_to_tensor(rgb), torch.float32, scale=True)
    return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
