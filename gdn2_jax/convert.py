"""Checkpoint conversion between gdn2_jax and PyTorch, both directions.

* The layer: `GatedDeltaRule2` <-> a PyTorch `GatedDeltaNet2` (fla's and NVIDIA's use the same
  names: q_proj, k_proj, v_proj, {q,k,v}_conv1d, f_proj.{0,1}, b_proj, w_proj, A_log, dt_bias,
  g_proj.{0,1}, o_norm, o_proj).
* The LM: `CausalLM` <-> NVIDIA's lit_gpt `GPT` (transformer.wte, transformer.h.N.{norm_1, attn,
  norm_2, mlp.swiglu.w1/w2/w3}, transformer.ln_f, lm_head). A GDN-2 block's `attn` is the layer
  above; an attention block's `attn` holds lit_gpt's fused `attn.attn` (per key/value group: the
  group's query heads, then its key head, then its value head) and `attn.proj`.

State dicts here are `{name: numpy array}` in PyTorch names and layouts (Linear weights [out, in],
depthwise Conv1d weights [D, 1, W]); loading also accepts torch tensors. Files: `.safetensors`
(no torch needed) or a `torch.save` file (`.pt`, `.pth`, `.bin`; needs torch). The JAX side of the
command line is a safetensors file of the flax parameters with the `ModelConfig` in its metadata:

    python -m gdn2_jax.convert --from-torch lit_gpt.pth --config hybrid-1.3b --out model.safetensors
    python -m gdn2_jax.convert --to-torch model.safetensors --out lit_gpt.pth

The output gate is not stored in a PyTorch checkpoint: NVIDIA's layer gates with SiLU (this
project's default), fla's with a sigmoid (`--set output_gate=sigmoid`).
"""

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax.layers import Attention, GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig
from gdn2_jax.typed_config import ConfigError, apply_overrides

StateDict = dict[str, np.ndarray]
JAX_FORMAT = "gdn2_jax.CausalLM"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "this conversion reads or writes PyTorch tensors and needs torch "
            "(pip install 'gdn2-jax[test]' or pip install torch); .safetensors files do not"
        ) from err
    return torch


def _to_numpy(x) -> np.ndarray:
    """numpy, JAX or torch array -> numpy (bfloat16 kept as ml_dtypes.bfloat16)."""
    if type(x).__module__.startswith("torch"):
        torch = _import_torch()
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(jnp.bfloat16)
        return x.numpy()
    return np.asarray(x)


def to_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A numpy state dict -> {name: torch.Tensor} (for `load_state_dict` or `torch.save`)."""
    torch = _import_torch()
    out = {}
    for name, x in state_dict.items():
        x = np.array(_to_numpy(x), order="C")  # a writable copy
        if x.dtype == jnp.bfloat16:
            out[name] = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(x)
    return out


# --------------------------------------------------------------------------------------------
# Parameter paths and layouts


def _params(module: nnx.Module) -> dict[tuple, np.ndarray]:
    return {
        tuple(path): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def _assign(module: nnx.Module, values: Mapping[tuple, np.ndarray]) -> None:
    """Writes `values` (flax paths -> arrays of the parameters' shapes) into `module`."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        old = var.get_value()
        var.set_value(jnp.asarray(values[tuple(path)], dtype=old.dtype))
    nnx.update(module, nnx.from_flat_state(flat))


def _torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
    """flax layout -> PyTorch layout of one parameter, by its path."""
    if path[-1] == "kernel":  # nnx.Linear [in, out] -> nn.Linear [out, in]
        return x.T
    if len(path) >= 2 and str(path[-2]).endswith("conv1d"):  # [W, D] -> Conv1d [D, 1, W]
        return x.T[:, None, :]
    return x


def _flax_layout(path: tuple, x: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return x.T
    if len(path) >= 2 and str(path[-2]).endswith("conv1d"):
        return x[:, 0, :].T if x.ndim == 3 else x
    return x


def _layer_name(path: tuple) -> str:
    """('f_proj', 'layers', 0, 'kernel') -> 'f_proj.0.weight' (nn.Sequential numbering)."""
    parts = [str(p) for p in path if p != "layers"]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _check_and_load(
    module: nnx.Module,
    state_dict: Mapping,
    names: Mapping[tuple, str],
    *,
    converted: Mapping[tuple, np.ndarray] | None = None,
    extra_ok: Sequence[str] = (),
    transposed: Sequence[tuple] = (),
    what: str,
) -> None:
    """Loads `state_dict[names[path]]` into each flax parameter, checking names and shapes.

    `converted` supplies flax-layout values computed elsewhere (fused tensors); `extra_ok` lists
    PyTorch names consumed outside `names`; `transposed` paths are stored transposed in PyTorch
    beyond the layout rules (the LM head).
    """
    params = _params(module)
    converted = dict(converted or {})
    missing = sorted(
        name for path, name in names.items() if path not in converted and name not in state_dict
    )
    used = {name for path, name in names.items() if path not in converted} | set(extra_ok)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not match: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    values = {}
    for path, x in params.items():
        if path in converted:
            value = converted[path]
        else:
            name = names[path]
            value = _flax_layout(path, _to_numpy(state_dict[name]))
            value = value.T if path in transposed else value
            if value.shape != x.shape:
                expected = x.T.shape if path in transposed else _torch_layout(path, x).shape
                got = tuple(_to_numpy(state_dict[name]).shape)
                raise ValueError(f"{what} key {name!r} has shape {got}, expected {expected}")
        values[path] = value
    _assign(module, values)


# --------------------------------------------------------------------------------------------
# The layer <-> PyTorch GatedDeltaNet2


def layer_state_dict(layer: GatedDeltaRule2) -> StateDict:
    """The PyTorch `GatedDeltaNet2` state dict of `layer` (numpy arrays, torch layouts)."""
    return {_layer_name(p): _torch_layout(p, x) for p, x in _params(layer).items()}


def load_layer_state_dict(layer: GatedDeltaRule2, state_dict: Mapping) -> GatedDeltaRule2:
    """Loads a PyTorch `GatedDeltaNet2` state dict (numpy or torch) into `layer`, in place.

    Names and shapes must match exactly (ValueError otherwise); values take the layer's
    parameter dtype.
    """
    names = {p: _layer_name(p) for p in _params(layer)}
    _check_and_load(layer, state_dict, names, what="GatedDeltaNet2")
    return layer


# --------------------------------------------------------------------------------------------
# The LM <-> lit_gpt GPT


def _lm_name(path: tuple) -> str:
    head = path[0]
    if head == "wte":
        return "transformer.wte.weight"
    if head == "lm_head":
        return "lm_head.weight"
    if head == "ln_f":
        return "transformer.ln_f.weight"
    _, i, part, *rest = path
    prefix = f"transformer.h.{i}"
    if part == "mixer":
        return f"{prefix}.attn.{_layer_name(tuple(rest))}"
    if part == "mlp":
        return f"{prefix}.mlp.swiglu.{_layer_name(tuple(rest))}"
    return f"{prefix}.{_layer_name((part, *rest))}"


def _lm_torch_layout(path: tuple, x: np.ndarray) -> np.ndarray:
    if path == ("lm_head",):
        return x.T
    return _torch_layout(path, x)


def _fuse_qkv(attn: Attention, q, k, v) -> np.ndarray:
    """Torch-layout q [H·D, C], k, v [Hkv·D, C] -> lit_gpt's `attn.attn.weight`."""
    groups, D = attn.num_kv_heads, attn.head_dim
    per = attn.num_heads // groups
    C = q.shape[-1]
    qkv = np.concatenate(
        [q.reshape(groups, per, D, C), k.reshape(groups, 1, D, C), v.reshape(groups, 1, D, C)],
        axis=1,
    )
    return qkv.reshape(-1, C)


def _split_qkv(attn: Attention, qkv: np.ndarray, name: str):
    groups, D = attn.num_kv_heads, attn.head_dim
    per = attn.num_heads // groups
    rows = (attn.num_heads + 2 * groups) * D
    if qkv.ndim != 2 or qkv.shape[0] != rows:
        raise ValueError(f"lit_gpt key {name!r} has shape {qkv.shape}, expected ({rows}, hidden)")
    qkv = qkv.reshape(groups, per + 2, D, -1)
    C = qkv.shape[-1]
    q, k, v = qkv[:, :per], qkv[:, per], qkv[:, per + 1]
    return q.reshape(-1, C), k.reshape(-1, C), v.reshape(-1, C)


def lm_state_dict(model: CausalLM) -> StateDict:
    """The lit_gpt `GPT` state dict of `model` (numpy arrays, torch layouts).

    A tied model writes its embedding as `lm_head.weight` too (lit_gpt always has a head).
    """
    params = _params(model)
    out = {}
    for path, x in params.items():
        if path[0] == "blocks" and model.blocks[path[1]].kind != "gdn2" and path[2] == "mixer":
            continue
        out[_lm_name(path)] = _lm_torch_layout(path, x)
    for i, block in enumerate(model.blocks):
        if block.kind == "gdn2":
            continue
        q, k, v, o = (params[("blocks", i, "mixer", n, "kernel")].T for n in ATTN_PROJ)
        out[f"transformer.h.{i}.attn.attn.weight"] = _fuse_qkv(block.mixer, q, k, v)
        out[f"transformer.h.{i}.attn.proj.weight"] = o
    if model.lm_head is None:
        out["lm_head.weight"] = params[("wte",)]
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def load_lm_state_dict(model: CausalLM, state_dict: Mapping) -> CausalLM:
    """Loads a lit_gpt `GPT` state dict (numpy or torch) into `model`, in place.

    The model's config must describe the checkpoint (block pattern, sizes); names and shapes
    must match exactly (ValueError otherwise). A tied model takes the embedding and requires
    `lm_head.weight`, when present, to equal it.
    """
    params = _params(model)
    names, converted, extra = {}, {}, []
    for path in params:
        if path[0] == "blocks" and model.blocks[path[1]].kind != "gdn2" and path[2] == "mixer":
            continue
        names[path] = _lm_name(path)
    for i, block in enumerate(model.blocks):
        if block.kind == "gdn2":
            continue
        fused, proj = f"transformer.h.{i}.attn.attn.weight", f"transformer.h.{i}.attn.proj.weight"
        for key in (fused, proj):
            if key not in state_dict:
                raise ValueError(f"lit_gpt state dict does not match: missing keys [{key!r}]")
        q, k, v = _split_qkv(block.mixer, _to_numpy(state_dict[fused]), fused)
        o = _to_numpy(state_dict[proj])
        for n, x in zip(ATTN_PROJ, (q, k, v, o), strict=True):
            path = ("blocks", i, "mixer", n, "kernel")
            if x.T.shape != params[path].shape:
                key = proj if n == "o_proj" else fused
                raise ValueError(
                    f"lit_gpt key {key!r} gives {n} of shape {x.shape}, "
                    f"expected {params[path].T.shape}"
                )
            converted[path] = x.T
        extra += [fused, proj]
    if model.lm_head is None and "lm_head.weight" in state_dict:
        head, wte = (_to_numpy(state_dict[n]) for n in ("lm_head.weight", "transformer.wte.weight"))
        if head.shape != wte.shape or not np.array_equal(head, wte):
            raise ValueError(
                "the config ties embeddings (tie_embeddings=True) but the checkpoint's "
                "lm_head.weight differs from transformer.wte.weight"
            )
        extra.append("lm_head.weight")
    _check_and_load(
        model,
        state_dict,
        names,
        converted=converted,
        extra_ok=extra,
        transposed=[("lm_head",)],
        what="lit_gpt",
    )
    return model


# --------------------------------------------------------------------------------------------
# Files


def save_torch_file(state_dict: Mapping, path: str | Path) -> None:
    """Writes a PyTorch state dict: safetensors for `.safetensors`, else `torch.save`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        arrays = {n: np.ascontiguousarray(_to_numpy(x)) for n, x in state_dict.items()}
        save_file(arrays, str(path))
    else:
        _import_torch().save(to_torch(state_dict), str(path))


def load_torch_file(path: str | Path) -> StateDict:
    """Reads a PyTorch state dict (safetensors, or a `torch.save` file) as numpy arrays.

    A `torch.save` checkpoint that wraps the weights (lit_gpt saves {"model": ...}; others use
    "state_dict") is unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    obj = _import_torch().load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {name: _to_numpy(x) for name, x in obj.items()}


def _flax_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save_jax(model: CausalLM, path: str | Path) -> None:
    """The model's parameters (flax names) and config in one safetensors file."""
    from safetensors.numpy import save_file

    arrays = {_flax_name(p): np.ascontiguousarray(x) for p, x in _params(model).items()}
    meta = {"format": JAX_FORMAT, "config": json.dumps(model.config.to_dict())}
    save_file(arrays, str(path), metadata=meta)


def load_jax(path: str | Path, *, config: ModelConfig | None = None) -> CausalLM:
    """A `CausalLM` from a `save_jax` file (its stored config unless `config` is given)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: a gdn2_jax model file is a .safetensors file (python -m gdn2_jax.convert "
            f"--from-torch writes one), not {path.suffix or 'a file without suffix'!r}"
        )
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != JAX_FORMAT and config is None:
        raise ValueError(f"{path} is not a gdn2_jax model file (no {JAX_FORMAT} metadata)")
    config = config or ModelConfig.from_dict(json.loads(meta["config"]))
    model = CausalLM(config, rngs=nnx.Rngs(0))
    params = {_flax_name(p): x.shape for p, x in _params(model).items()}
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for name, shape in params.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{path}: {name!r} has shape {arrays[name].shape}, expected {shape}")
    _assign(model, {p: arrays[_flax_name(p)] for p in _params(model)})
    return model


# --------------------------------------------------------------------------------------------
# Command line


def config_from_args(config: str, overrides: Sequence[str] = ()) -> ModelConfig:
    """A preset name or a JSON file of ModelConfig fields, with FIELD=VALUE overrides parsed
    by the fields' types (`gdn2_jax.typed_config`, the parser train.py uses)."""
    if config.endswith(".json"):
        try:
            fields = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {config}: {e}") from None
        cfg = ModelConfig.from_dict(fields)
    else:
        cfg = ModelConfig.preset(config)
    return apply_overrides(cfg, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gdn2_jax.convert",
        description="Convert GDN-2 LM checkpoints between lit_gpt (PyTorch) and gdn2_jax.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", metavar="PATH", help="lit_gpt state dict to read")
    direction.add_argument("--to-torch", metavar="PATH", help="gdn2_jax .safetensors to read")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument(
        "--config", help="with --from-torch: a ModelConfig preset name or a .json of its fields"
    )
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)

    if args.from_torch and not args.config:
        parser.error("--from-torch needs --config (a preset name or a .json file)")
    if args.to_torch and (args.config or args.set):
        parser.error("--to-torch reads the config stored in the file; drop --config/--set")
    try:
        if args.from_torch:
            model = CausalLM(config_from_args(args.config, args.set), rngs=nnx.Rngs(0))
            load_lm_state_dict(model, load_torch_file(args.from_torch))
            save_jax(model, args.out)
        else:
            save_torch_file(lm_state_dict(load_jax(args.to_torch)), args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
