"""On-disk cache of converted checkpoints, so a GGUF is dequantised once, not on every start.

Dequantising SmolLM2's Q4_1 GGUF through transformers takes ~20 s; reading the result back from a
safetensors file takes well under a second. An entry is keyed by the source file's name, size and
mtime, so replacing the file (e.g. upgrading the package) invalidates it. Inside an entry:

    meta/                      spec.json + the tokenizer's save_pretrained() files
    weights-<dtype>.safetensors

Every piece is written to a temporary name and renamed into place, because tests and Ray workers may
fill the same entry concurrently: a reader sees either nothing or a complete file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch

from orbitflow_ray.model.spec import ModelSpec

ENV_VAR = "ORBITFLOW_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "orbitflow")


def entry_dir(source: Path) -> Path:
    st = source.stat()
    return cache_root() / f"{source.stem}-{st.st_size}-{st.st_mtime_ns}"


def weights_path(entry: Path, dtype: torch.dtype) -> Path:
    return entry / f"weights-{str(dtype).removeprefix('torch.')}.safetensors"


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_dir_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory, then rename it to `final`; losing a race is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        fill(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomically(final: Path, write: Callable[[Path], None]) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def spec_to_json(spec: ModelSpec) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(spec), indent=1)


def spec_from_json(text: str) -> ModelSpec:
    d = json.loads(text)
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelSpec(**d)


def save_weights(path: Path, weights: dict[str, torch.Tensor], tied: bool) -> None:
    """safetensors refuses shared tensors, so a tied lm_head is dropped here and re-tied on load."""
    from safetensors.torch import save_file

    out = {k: v.contiguous() for k, v in weights.items() if not (tied and k == "lm_head.weight")}

    def write(tmp: Path) -> None:
        save_file(out, str(tmp))
        os.chmod(tmp, 0o644)  # safetensors creates it 0600; the cache may be shared by users

    write_file_atomically(path, write)


def load_weights(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(str(path))
    if tied:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return weights
