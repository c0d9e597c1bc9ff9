"""Artifact store: encodes decoded frames as PNG / MP4 (H.264) / NPY into the output directory.

Files are named after the job id. PNG carries the prompt and seed as text chunks; MP4 carries
them in its container metadata (title = prompt, comment = JSON of the parameters), handed to
ffmpeg as an ffmetadata file, never on its command line (a long prompt would overflow argv and
a NUL would cut it).
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

CHUNK_BYTES = 1 << 20
_EXT = {pb.OUTPUT_FORMAT_PNG: ".png", pb.OUTPUT_FORMAT_MP4: ".mp4", pb.OUTPUT_FORMAT_NPY: ".npy"}
_MEDIA = {".png": "image/png", ".mp4": "video/mp4", ".npy": "application/x-npy"}


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


class ArtifactStore:
    """Writes and reads artifacts under one directory; ids are job ids."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, job_id: str, frames: np.ndarray, params: pb.GenerationParams) -> pb.Artifact:
        """frames: uint8 (F, H, W, 3). Blocking: call from a thread."""
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
        ext = _EXT[params.output_format]
        path = self.root / f"{job_id}{ext}"
        tmp = path.with_name(f"{job_id}.part{ext}")  # ffmpeg picks the container from the extension
        if ext == ".png":
            tmp.write_bytes(encode_png(frames, params))
        elif ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, frames)
        else:
            encode_mp4(frames, params, tmp)
        os.replace(tmp, path)
        data = path.read_bytes()
        return pb.Artifact(
            id=job_id,
            file_name=path.name,
            media_type=_MEDIA[ext],
            size_bytes=len(data),
            width=frames.shape[2],
            height=frames.shape[1],
            num_frames=frames.shape[0],
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def path_of(self, artifact: pb.Artifact) -> Path:
        return self.root / artifact.file_name

    def delete(self, artifact: pb.Artifact) -> None:
        self.path_of(artifact).unlink(missing_ok=True)

    def chunks(self, artifact: pb.Artifact):
        """Yields the file in CHUNK_BYTES pieces. Blocking reads: iterate from a thread."""
        with open(self.path_of(artifact), "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
