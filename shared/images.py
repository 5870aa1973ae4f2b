"""Image decoding with hostile input in mind, capture-time reading, crops and model inputs."""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
FILENAME_TIME = re.compile(r"^(?P<site>[A-Za-z0-9-]+)_(?P<date>\d{8})_(?P<time>\d{6})(?:\D|$)")
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL, _DATETIME = 36867, 36881, 306


class ImageRejected(ValueError):
    """The bytes are not an image we accept; the message says why, for a 4xx answer."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str
    width: int
    height: int
    exif_time: datetime | None


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Decode and fully validate an uploaded image; raises ImageRejected with a clear reason."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(f"file is {len(data)} bytes, over the limit of {max_bytes}", status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            width, height = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"image declares too many pixels (decompression bomb?): {exc}", status=413) from None
    except UnidentifiedImageError:
        raise ImageRejected("not a decodable image (JPEG, PNG or WebP expected)") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same to the uploader
        raise ImageRejected(f"not a decodable image: {exc}") from None
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(f"image format {fmt} not accepted (JPEG, PNG or WebP expected)", status=415)
    # Check the declared size before decoding a single pixel: a decompression bomb declares a huge one.
    if width * height > max_pixels:
        raise ImageRejected(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                            status=413)
    if width < 16 or height < 16:
        raise ImageRejected(f"image is {width}x{height}, too small to identify anything")
    exif_time = _exif_time(probe)
    try:
        probe.load()  # a truncated or corrupt stream fails here
        image = ImageOps.exif_transpose(probe).convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected(f"image data is truncated or corrupt: {exc}") from None
    return DecodedImage(image=image, format=fmt, width=image.width, height=image.height, exif_time=exif_time)


def _exif_time(image: Image.Image) -> datetime | None:
    """DateTimeOriginal (with its offset when present, else taken as UTC), or None."""
    try:
        exif = image.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        raw = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        if not raw:
            return None
        when = datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
        offset = sub.get(_OFFSET_TIME_ORIGINAL)
        if offset and re.fullmatch(r"[+-]\d\d:\d\d", str(offset)):
            sign = 1 if str(offset)[0] == "+" else -1
            hours, minutes = int(str(offset)[1:3]), int(str(offset)[4:6])
            return when.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
        return when.replace(tzinfo=timezone.utc)
    except Exception:  # noqa: BLE001 - unreadable EXIF is simply no EXIF time
        return None


def filename_time(name: str) -> tuple[str, datetime] | None:
    """(site, time) from a `SITE_YYYYMMDD_HHMMSS...` file name (taken as UTC), or None."""
    match = FILENAME_TIME.match(name)
    if not match:
        return None
    try:
        when = datetime.strptime(match["date"] + match["time"], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return match["site"], when


def crop_jpeg(image: Image.Image, box: tuple[int, int, int, int], max_side: int, quality: int = 90) -> bytes:
    """The box's pixels as a JPEG, downscaled so its long side is at most `max_side`."""
    crop = image.crop(box)
    if max(crop.size) > max_side:
        scale = max_side / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                           Image.Resampling.BILINEAR)
    out = io.BytesIO()
    crop.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def model_input(jpeg: bytes, size: int) -> np.ndarray:
    """A crop's JPEG bytes -> uint8 HWC RGB array of size x size (aspect squashed, as the models were run)."""
    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("RGB", (size, size))  # let libjpeg decode at reduced scale when the crop is much larger
        rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


MAX_CROP_SIDE = 4096  # px: crops are made at most crop_max_side long; anything bigger is refused unread


def decode_crop(crop: bytes) -> np.ndarray | str:
    """An event's crop as RGB uint8, or why it cannot be read (the size is checked before decoding, so a
    hostile event cannot make a service decode a pixel bomb). Extractors answer the reason as "no evidence"."""
    try:
        with Image.open(io.BytesIO(crop)) as im:
            if max(im.size) > MAX_CROP_SIDE:
                return f"oversized-crop {im.size[0]}x{im.size[1]}"
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception:  # noqa: BLE001 - whatever the decoder says, the crop is unreadable
        return "unreadable-crop"
