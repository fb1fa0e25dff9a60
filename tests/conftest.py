"""Tiny models built in memory: a 2-layer Llama and a byte-level tokenizer. Nothing is downloaded."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("ZOPRO_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

import zopro  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tiny_tokenizer():
    """Byte-level: one token per byte (BPE with no merges) plus three special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", chat_template=CHAT_TEMPLATE, padding_side="left")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def with_adapters(model, seed=0):
    """LoRA on every attention/MLP linear, the four adapters of a run, B random so that adapters matter."""
    zopro.add_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 4, 8)
    for i, name in enumerate((zopro.REFERENCE, zopro.POLICY, zopro.REWARD)):
        zopro.add_adapter(model, name, seed + i)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name in (zopro.REFERENCE, zopro.REWARD):
            for k, p in zopro.adapter_params(model, name).items():
                if k.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    zopro.load_adapter_state(model, zopro.POLICY, zopro.adapter_state(model, zopro.REFERENCE))
    return model


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def model(tok):
    return with_adapters(tiny_llama(len(tok)))


@pytest.fixture
def rm(model):
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    return zopro.RewardModel(zopro.REWARD, head)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """A saved tiny model folder, for the CLI tests (`--model DIR`)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def prompts(tok, texts):
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for t in texts]
    return zopro.pack(ids, [[]] * len(ids), tok.pad_token_id)
