"""Model and cluster presets shipped as JSON beside this file, and lookup by name or path.

A model argument is a preset name (`llama-7b`), a preset-format JSON file, or a HuggingFace
`config.json`; a cluster argument is a preset name or a preset-format JSON file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from costmodel.specs import ClusterSpec, ModelSpec, SpecError
from profiles.table import read_json

_ROOT = resources.files("costmodel.presets")


def _names(kind: str) -> list[str]:
    return sorted(p.name[:-5] for p in _ROOT.joinpath(kind).iterdir() if p.name.endswith(".json"))


def model_names() -> list[str]:
    return _names("models")


def cluster_names() -> list[str]:
    return _names("clusters")


def _read_json(path: Path) -> dict:
    data = read_json(path, "spec", SpecError)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object, not {type(data).__name__}")
    return data


def load_model(name_or_path: str) -> ModelSpec:
    """A model preset by name, or a spec / HuggingFace config file by path."""
    if name_or_path in model_names():
        return ModelSpec.from_dict(json.loads(_ROOT.joinpath("models", f"{name_or_path}.json").read_text()),
                                   origin=f"model preset {name_or_path}")
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if p.is_dir():
            p = p / "config.json"
        data = _read_json(p)
        if "num_hidden_layers" in data or "text_config" in data:  # HF: a decoder, or a multimodal model's
            return ModelSpec.from_hf_config(p)
        return ModelSpec.from_dict(data, origin=str(p))
    raise SpecError(f"unknown model {name_or_path!r}; presets: {', '.join(model_names())} "
                    "(or a path to a config.json)")


def load_cluster(name_or_path: str) -> ClusterSpec:
    """A cluster preset by name, or a cluster spec file by path."""
    if name_or_path in cluster_names():
        return ClusterSpec.from_dict(json.loads(_ROOT.joinpath("clusters", f"{name_or_path}.json").read_text()),
                                     origin=f"cluster preset {name_or_path}")
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        return ClusterSpec.from_dict(_read_json(p), origin=str(p))
    raise SpecError(f"unknown cluster {name_or_path!r}; presets: {', '.join(cluster_names())} "
                    "(or a path to a cluster JSON file)")
