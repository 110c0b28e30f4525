"""Offline fixtures: a tiny byte-level BPE tokenizer and 2-layer Llama models built locally."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "The movie was wonderful, a delight from start to finish.",
    "The movie was terrible and boring, I wanted to leave.",
    "Human: What is the capital of France? Assistant: Paris is the capital.",
    "Write a short review of a film about space, robots and friendship.",
    "I loved the acting; the plot was weak but the music was great!",
] * 4

# {{ bos_token }} in the template: the rendered text already holds BOS, so tokenizing it with
# add_special_tokens=True would duplicate it (a bug the data module must avoid).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE, pad: bool = True):
    """A ~300-token byte-level BPE that, like Llama's, prepends BOS and never appends EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = chat_template
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **overrides,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep load_dataset's Arrow files (and the map caches beside them) inside the test's dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved 2-layer Llama (with its tokenizer): what `model_name_or_path` points to."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory, tokenizer):
    """A different 2-layer Llama (other seed): a reference unequal to the policy."""
    path = tmp_path_factory.mktemp("tiny-llama-ref")
    build_model(len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
