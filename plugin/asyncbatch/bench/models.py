# SPDX-License-Identifier: Apache-2.0
"""``--model``: a local model folder, or ``dummy:SHAPE`` for a dummy-weight folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from asyncbatch.sim.model_dir import SHAPES

DUMMY_PREFIX = "dummy:"


class ModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    path: str
    shape: str | None
    dummy: bool

    @property
    def load_format(self) -> str:
        return "dummy" if self.dummy else "auto"

    @property
    def label(self) -> str:
        return self.shape or Path(self.path).name


def models_cache() -> Path:
    base = os.environ.get("ASYNCBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncbatch")
    return Path(base) / "models"


def resolve_model(text: str, *, cache_dir: str | Path | None = None,
                  create: bool = True) -> ModelSpec:
    """``dummy:llama-8b`` -> a config + tokenizer folder (weights are random,
    ``load_format="dummy"``), written once under the cache; a path -> itself.

    Raises:
        ModelError: unknown shape, or a path that is not a model folder.
    """
    if text.startswith(DUMMY_PREFIX):
        shape = text[len(DUMMY_PREFIX):]
        if shape not in SHAPES:
            raise ModelError(f"unknown dummy model shape {shape!r}; choose one of "
                             f"{', '.join(DUMMY_PREFIX + s for s in SHAPES)}")
        folder = Path(cache_dir or models_cache()) / f"dummy-{shape}"
        if create and not (folder / "tokenizer.json").is_file():
            from asyncbatch.sim.model_dir import write_model_dir

            write_model_dir(folder, shape)
        return ModelSpec(str(folder), shape, True)
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ModelError(
            f"model folder {text!r} {what}. Give a local model folder, or use a dummy-weight "
            f"model of a given shape, e.g. --model dummy:llama-8b (shapes: "
            f"{', '.join(SHAPES)}); nothing is downloaded.")
    return ModelSpec(str(path.resolve()), None, False)
