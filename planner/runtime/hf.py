"""A HuggingFace transformers decoder (Llama, Qwen2, Mistral) replayed instead of the built-in one.

transformers builds the model from a config.json (no hub access): projections, RoPE with the config's
base and scaling, norms with its eps, MLP, tied embeddings. Only the attention core is meshplan's:
the model's `_attn_implementation` is "meshplan", a function registered with transformers'
AttentionInterface that hands the local (q, k, v) to the unit's `Attention` (packed, ring or all-gather
CP, sliced KV cache), which `HFDecoder.run_layers` passes down through each layer call's kwargs.
Positions are meshplan's per-document positions (a packed document restarts at 0).

HFDecoder has the built-in Decoder's interface (embed, layers, norm, head, run_layers, logits,
stage_parameters), so the unit step, the pipeline stages, the gradient sync and `--check` run it
unchanged. `build_hf_model` builds it on the meta device and materialises only the parameters of one
pipeline stage (seeded init per parameter name, or the owned tensors read from a safetensors file);
the others stay empty. TP > 1 is refused before any rank starts (planner/runtime/hf_spec.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from planner.runtime.hf_spec import read_hf_config
from planner.runtime.model import Attention, Decoder, ModelConfig, stage_parameters

ATTN_IMPL = "meshplan"


def _meshplan_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention hook: query [1, Hq, T, D], key and value [1, Hkv, T, D] (after RoPE) ->
    ([1, T, Hq, D], no weights), computed by the meshplan Attention in kwargs."""
    attn = kwargs.get("meshplan_attn")
    if attn is None:
        raise RuntimeError("meshplan attention called without a unit's attention; run the model through "
                           "HFDecoder.run_layers")
    d = query.shape[-1]
    if dropout or (scaling is not None and abs(scaling * d ** 0.5 - 1.0) > 1e-9):
        raise RuntimeError(f"meshplan attention computes softmax(q·k / sqrt({d})) without dropout; the model asks "
                           f"scaling {scaling}, dropout {dropout}")
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, H, D]
    layer = kwargs["meshplan_layer"]
    if kwargs.get("meshplan_recompute_core"):  # selective: the core's activations are recomputed in backward
        core = checkpoint(attn, q, k, v, layer, use_reentrant=False)
    else:
        core = attn(q, k, v, layer)
    return core.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPL, _meshplan_attention)


class HFDecoder(Decoder):
    """A transformers CausalLM's pieces behind the Decoder interface: tokens [T] + positions [T] ->
    logits [T, V], one flat token dimension (the HF layers see a batch of one)."""

    def __init__(self, lm: nn.Module, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)  # not Decoder's: the modules are transformers'
        self.cfg = cfg
        inner = lm.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.head = None if lm.config.tie_word_embeddings else lm.lm_head  # tied: logits use embed.weight

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, attn: Attention, start: int,
                   end: int) -> torch.Tensor:
        h, pos = x.unsqueeze(0), positions.unsqueeze(0)
        cos_sin = self.rotary(h, pos)  # the config's RoPE (base, scaling), fp32 as the built-in's tables
        with self.cfg.autocast(x.device):
            for i in range(start, end):
                if self.cfg.recompute == "full":  # only the layer's input is kept; its forward reruns in backward
                    h = checkpoint(self._layer, h, cos_sin, pos, attn, i, use_reentrant=False)
                else:
                    h = self._layer(h, cos_sin, pos, attn, i)
        return h[0]

    def _layer(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor,
               attn: Attention, i: int) -> torch.Tensor:
        out = self.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin,
                             meshplan_attn=attn, meshplan_layer=i,
                             meshplan_recompute_core=self.cfg.recompute == "selective")
        return out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returns a tuple


def hf_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a config.json, read locally (no hub)."""
    d = dict(read_hf_config(path))
    return AutoConfig.for_model(d.pop("model_type"), **d)


# HF state_dict names of the HFDecoder's parameters (embed, layers.*, norm, head).
_HF_PREFIX = (("embed.", "model.embed_tokens."), ("layers.", "model.layers."), ("norm.", "model.norm."),
              ("head.", "lm_head."))


def hf_name(name: str) -> str:
    """The checkpoint name of an HFDecoder parameter."""
    for ours, theirs in _HF_PREFIX:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(name)


class Checkpoint:
    """Tensors of a safetensors checkpoint, read one at a time: a .safetensors file, or a directory with
    model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.path = p
        if p.is_dir() and (p / "model.safetensors.index.json").is_file():
            weight_map = json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]
            self.files = {name: p / f for name, f in weight_map.items()}
        else:
            f = p / "model.safetensors" if p.is_dir() else p
            with safe_open(f, framework="pt") as sf:
                self.files = {name: f for name in sf.keys()}

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"--hf-weights {self.path}: no tensor {name!r} (a checkpoint of another config?)")
        with safe_open(self.files[name], framework="pt") as sf:
            t = sf.get_tensor(name)
        if t.shape != shape:
            raise ValueError(f"--hf-weights {self.path}: {name!r} has shape {tuple(t.shape)}, the config's model "
                             f"{tuple(shape)}")
        return t.float()  # fp32 master weights whatever the checkpoint's dtype


def _seeded(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Deterministic init of one parameter from (seed, name) alone, so a rank materialising only its
    stage gets the values every other rank (and the reference) would: norms 1, biases 0, else N(0, 0.02²)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=g) * 0.02


def build_hf_model(config_path: str | Path, cfg: ModelConfig, seed: int, device: torch.device,
                   weights: str | Path | None = None,
                   stage: tuple[tuple[tuple[int, int], ...], int, int] | None = None) -> HFDecoder:
    """The HF model of `config_path` on `device`, built on the meta device; `stage` = (layer ranges, pp,
    stage): only that pipeline stage's parameters are materialised, the others are empty tensors (None:
    all of them). Values come from `weights` (a safetensors checkpoint) or a seeded init."""
    hc = hf_config(config_path)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hc, attn_implementation=ATTN_IMPL, dtype=torch.float32)
    model = HFDecoder(lm, cfg)
    model.rotary = type(model.rotary)(config=lm.config).to(device)  # its inv_freq buffer, computed for real
    names = {id(p): n for n, p in model.named_parameters()}
    own = (set(names.values()) if stage is None
           else {names[id(p)] for p in stage_parameters(model, stage[0], stage[1], stage[2])})
    source = Checkpoint(weights) if weights is not None else None
    made: dict[int, nn.Parameter] = {}  # one new parameter per old one: tied weights stay tied
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                name = names[id(p)]
                if name not in own:
                    data = torch.empty(0)
                elif source is not None:
                    data = source.get(hf_name(name), p.shape)
                else:
                    data = _seeded(name, p.shape, seed)
                made[id(p)] = nn.Parameter(data.to(device))
            setattr(module, key, made[id(p)])
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"{config_path}: buffers {meta} were not materialised")
    return model.train()
