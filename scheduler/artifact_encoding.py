"""Artifact encoding: decoded frames as PNG / MP4 (H.264) / NPY, described as a pb.Artifact.

PNG carries the prompt and seed as text chunks; MP4 carries them in its container metadata
(title = prompt, comment = JSON of the parameters), handed to ffmpeg as an ffmetadata file, never
on its command line (a long prompt would overflow argv and a NUL would cut it). Where the encoded
file goes is the store's business (artifacts.py and its implementations).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

EXTENSIONS = {pb.OUTPUT_FORMAT_PNG: ".png", pb.OUTPUT_FORMAT_MP4: ".mp4", pb.OUTPUT_FORMAT_NPY: ".npy"}
MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".npy": "application/x-npy"}


def describe(params: pb.GenerationParams) -> dict:
    """The metadata written into every artifact."""
    meta = json_format.MessageToDict(params, preserving_proto_field_name=True)
    meta.pop("images", None)  # may be large; not needed to reproduce a text-only job
    meta["seed"] = str(params.seed)
    return meta


def encode_png(frames: np.ndarray, params: pb.GenerationParams) -> bytes:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", params.prompt)
    info.add_text("seed", str(params.seed))
    info.add_text("parameters", json.dumps(describe(params)))
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def ffmetadata(tags: dict[str, str]) -> str:
    """An ffmetadata file (ffmpeg's -f ffmetadata) holding `tags` as global metadata: '=', ';',
    '#', '\\' and newlines escaped with a backslash; NUL, which the format cannot carry, dropped."""
    def escape(text: str) -> str:
        text = text.replace("\0", "")
        for special in ("\\", "=", ";", "#", "\n"):
            text = text.replace(special, "\\" + special)
        return text

    return ";FFMETADATA1\n" + "".join(f"{escape(key)}={escape(value)}\n" for key, value in tags.items())


def encode_mp4(frames: np.ndarray, params: pb.GenerationParams, path: Path) -> None:
    """H.264 (libx264, CRF 18, yuv420p) with the prompt and parameters as container metadata,
    read by ffmpeg from a metadata file beside the output (nothing user-given in argv)."""
    import imageio_ffmpeg

    _, height, width, _ = frames.shape
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".ffmeta", dir=path.parent, delete=False) as meta:
        meta.write(ffmetadata({"title": params.prompt, "comment": json.dumps(describe(params))}))
    try:
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y",
            "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(params.fps), "-i", "-",
            "-f", "ffmetadata", "-i", meta.name,
            "-map", "0:v:0", "-map_metadata", "1",
            "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart",
            "-v", "error", str(path),
        ]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    finally:
        os.unlink(meta.name)


def extension(params: pb.GenerationParams) -> str:
    """The file extension of the job's output format ('.png', '.mp4' or '.npy')."""
    return EXTENSIONS[params.output_format]


def encode_file(frames: np.ndarray, params: pb.GenerationParams, path: Path) -> None:
    """Writes frames, uint8 (F, H, W, 3), to `path` in the params' output format; ffmpeg picks
    the MP4 container from the path's extension, so `path` must end in extension(params)."""
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    ext = extension(params)
    assert path.suffix == ext, (path, ext)
    if ext == ".png":
        path.write_bytes(encode_png(frames, params))
    elif ext == ".npy":
        with open(path, "wb") as f:
            np.save(f, frames)
    else:
        encode_mp4(frames, params, path)


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def encode_artifact(job_id: str, frames: np.ndarray, params: pb.GenerationParams, path: Path) -> pb.Artifact:
    """Encodes frames into `path` (a temporary name ending in the format's extension) and
    returns the artifact's description, its file name `<job id><ext>`. Blocking."""
    encode_file(frames, params, path)
    size, sha256 = file_digest(path)
    ext = extension(params)
    return pb.Artifact(
        id=job_id,
        file_name=f"{job_id}{ext}",
        media_type=MEDIA_TYPES[ext],
        size_bytes=size,
        width=frames.shape[2],
        height=frames.shape[1],
        num_frames=frames.shape[0],
        sha256=sha256,
    )
