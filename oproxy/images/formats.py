"""
Image formats: what Ollama reads, what is converted, what is refused.

Ollama's runners read JPEG and PNG; WebP too (its Go and MLX engines decode
it, and for llama.cpp models the server transcodes it itself since 0.32.14).
GIF, BMP and TIFF fail late inside a runner, or not at all depending on the
model, so the proxy converts them to PNG (a GIF's first frame, a TIFF's
first page).  The format is read from the bytes, never from the declared
media type, and every image's header is parsed: garbage behind a PNG
signature is a clear 400 here rather than a failure in the model runner.

Decoding is bounded by :data:`MAX_PIXELS`, checked from the header before
any pixel is decoded (a 40 KB GIF can declare a 20,000 x 20,000 canvas).
Converting is CPU work of tens to hundreds of milliseconds
(a 2048 x 2048 GIF took half a second when measured), so the HTTP layer runs
it in a thread (:mod:`oproxy.images.fetch`); the header checks take tens of
microseconds and run where they are called.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Final

from PIL import Image, UnidentifiedImageError

#: Largest image, in pixels, that is passed on or converted: 50 megapixels
#: (8660 x 5773), above any camera's photo a model would be shown; the models
#: scale images down to about a megapixel anyway.
MAX_PIXELS: Final = 50_000_000

#: Formats Ollama reads, passed on unchanged, by Pillow's name.
ACCEPTED: Final = ("JPEG", "PNG", "WEBP")
#: Formats converted to PNG.
CONVERTED: Final = ("GIF", "BMP", "TIFF")
#: What an error says the server accepts.
ACCEPTED_TEXT: Final = "JPEG, PNG and WebP (GIF, BMP and TIFF are converted to PNG)"


class UnusableImage(ValueError):
    """
    An image that cannot be given to the model.  The message reads after
    "The image at 'messages.0.content.1.image_url' ..." and names the format.
    """


@dataclass(frozen=True)
class Kind:
    """What the first bytes say: a format's name, and what becomes of it."""

    name: str
    #: ``pass`` (as is), ``convert`` (to PNG), ``audio`` (Ollama takes it
    #: for audio models), ``refuse`` (a known format Ollama cannot read).
    action: str


_JPEG = Kind("JPEG", "pass")
_PNG = Kind("PNG", "pass")
_WEBP = Kind("WEBP", "pass")
_GIF = Kind("GIF", "convert")
_BMP = Kind("BMP", "convert")
_TIFF = Kind("TIFF", "convert")
_AUDIO = Kind("audio", "audio")

#: Bytes needed to tell every format here apart.
SNIFF_BYTES: Final = 32

_FTYP_BRANDS: Final = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
}
_BMP_HEADER_SIZES: Final = frozenset((12, 16, 40, 52, 56, 64, 108, 124))


def sniff(head: bytes) -> Kind | None:
    """
    The kind of media ``head`` (at least the first :data:`SNIFF_BYTES`
    bytes, when there are that many) starts, from its magic number;
    ``None`` for anything unrecognised.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return _JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _PNG
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _WEBP
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _GIF
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES
    ):
        return _BMP
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return _TIFF
    # Ollama's own test for audio (llm.AudioFormat): WAV, MP3 with or
    # without an ID3 tag.
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _AUDIO
    if head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return _AUDIO
    return _refused_kind(head)


def _refused_kind(head: bytes) -> Kind | None:
    """Image formats worth naming in a refusal."""
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_BRANDS:
        return Kind(_FTYP_BRANDS[head[8:12]], "refuse")
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return Kind("JPEG XL", "refuse")
    if head.startswith(b"\x00\x00\x01\x00"):
        return Kind("ICO", "refuse")
    if head.startswith(b"8BPS"):
        return Kind("PSD", "refuse")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml")):
        return Kind("SVG", "refuse")
    return None


def _display(name: str) -> str:
    return "WebP" if name == "WEBP" else name


def unsupported(kind: Kind | None) -> UnusableImage:
    """The refusal for a format the model cannot be given."""
    what = f"is in the {_display(kind.name)} format" if kind else "is not in a known image format"
    return UnusableImage(f"{what}, which is not supported; supported: {ACCEPTED_TEXT}.")


def _open(data: bytes, kind: Kind) -> Image.Image:
    """The image, its header read and its size checked; nothing decoded yet."""
    try:
        image = Image.open(io.BytesIO(data), formats=[kind.name])
    except Image.DecompressionBombError:
        raise _too_large(None) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise _corrupt(kind) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise _too_large((width, height))
    if width <= 0 or height <= 0:
        image.close()
        raise _corrupt(kind)
    return image


def _corrupt(kind: Kind) -> UnusableImage:
    return UnusableImage(f"is not a valid {_display(kind.name)} image (it cannot be decoded).")


def _too_large(size: tuple[int, int] | None) -> UnusableImage:
    declared = f" ({size[0]} x {size[1]})" if size else ""
    return UnusableImage(f"has too many pixels{declared}; the limit is {MAX_PIXELS:,} pixels.")


def check(data: bytes, kind: Kind) -> None:
    """
    Read the header of an image passed on as is: a clear refusal for a
    corrupt one or one over :data:`MAX_PIXELS`, before Ollama sees it.
    """
    _open(data, kind).close()


def to_png(data: bytes, kind: Kind) -> bytes:
    """
    The first frame (or page) of a GIF, BMP or TIFF as a PNG.  Fast
    compression: the PNG only travels to Ollama, usually over loopback.
    """
    with _open(data, kind) as image:
        try:
            image.seek(0)
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            frame = image.convert("RGBA" if has_alpha else "RGB")
        except (OSError, ValueError, SyntaxError, EOFError):
            raise _corrupt(kind) from None
    out = io.BytesIO()
    frame.save(out, "PNG", compress_level=1)
    return out.getvalue()


def for_ollama(data: bytes) -> bytes | None:
    """
    ``data`` as Ollama can read it: ``None`` when it can be passed on as is
    (checked), else the PNG it was converted to.

    :raises UnusableImage: for another format, a corrupt image, or one with
        too many pixels.
    """
    kind = sniff(data[:SNIFF_BYTES])
    if kind is None or kind.action == "audio":
        raise unsupported(None)
    if kind.action == "refuse":
        raise unsupported(kind)
    if kind.action == "pass":
        check(data, kind)
        return None
    return to_png(data, kind)


def needs_conversion(head: bytes) -> bool:
    """Whether an image starting with ``head`` is one that is converted."""
    kind = sniff(head)
    return kind is not None and kind.action == "convert"
