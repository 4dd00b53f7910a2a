import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of a given architecture, built from a config (no download)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, num_hidden_layers=layers)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_key_value_heads=2, **common)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, **common)
    elif arch == "phi":
        cfg = tf.PhiConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
    else:
        raise ValueError(arch)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model, loaded once per test session (read-only: tests deep-copy it)."""
    from bcllm import load_model

    return load_model("smollm2-135m")
