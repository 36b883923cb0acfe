"""Tiny random causal LMs built from transformers configs (no download): GPT-2 and Qwen2 style, two
blocks of width 32, vocabulary 64, for the tests that train or splice through a language model."""
import torch


def tiny_lm(arch: str, seed: int, d: int = 32, vocab: int = 64):
    """A 2-block ``arch`` ("gpt2" or "qwen2") LM with random weights drawn after ``torch.manual_seed(seed)``,
    in eval mode."""
    import transformers
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=d, n_head=4, vocab_size=vocab, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, initializer_range=0.2)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=d, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32, bos_token_id=0,
                                   eos_token_id=0, initializer_range=0.2)
    return transformers.Qwen2ForCausalLM(cfg).eval()
