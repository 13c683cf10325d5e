"""
The models of a run, built before training: the policy (a scratch Llama from the config globals, or a local HF
directory), its switches (dropout off, gradient checkpointing) and the frozen reference (DPO) / teacher (KD).
bipost.py calls these in order with its config as arguments; bad input raises ValueError with a one-line message,
which bipost.py prints as its error.
"""
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from objectives import check_head
from reference_cache import weights_digest

hf_logging.disable_progress_bar()


def load_model(source, meta, seed, n_layer, n_head, n_embd, block_size):
    """'scratch': a Llama built from the config globals (n_layer ... block_size) and the data's vocab and special ids,
    its weights from seed, so that the reference rebuilds the initial policy exactly; else a local HF directory, in fp32
    on the CPU, whose log-probs bipost must reproduce (objectives.check_head)."""
    if source == 'scratch':
        torch.manual_seed(seed)
        hf_config = LlamaConfig(vocab_size=meta['vocab_size'], hidden_size=n_embd, intermediate_size=4 * n_embd,
                                num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                                max_position_embeddings=block_size, tie_word_embeddings=False,
                                bos_token_id=meta['eos_id'], eos_token_id=meta['eos_id'], pad_token_id=meta['pad_id'])
        return AutoModelForCausalLM.from_config(hf_config)
    if not os.path.isdir(source) or not os.path.exists(os.path.join(source, 'config.json')):
        raise ValueError(f"model '{source}' is not a local HF model directory (with config.json); "
                         f"use 'scratch', 'resume' or a path written by save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    try:  # on CPU in fp32, before any cast or ZeRO-3 partitioning: bipost's log-probs must be the model's own
        check_head(model)
    except ValueError as e:
        raise ValueError(f"model '{source}': {e}") from None
    return model


def check_vocab(model, source, meta, meta_path):
    """The model's vocab (rows of its LM head), which must hold every id the data was tokenized with."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if meta['vocab_size'] > vocab:
        raise ValueError(f"{meta_path}: the data was tokenized with vocab_size {meta['vocab_size']} ({meta['tokenizer']}) "
                         f"but model '{source}' has {vocab} ids: prepare the data with this model's tokenizer")
    return vocab


def drop_dropout(model):
    """Every dropout probability of the model to 0 (TRL's default). Eager attention reads the probability its module
    copied from the config at construction, so the modules' own attributes are set too, not only the config's."""
    for part in [model.config, *model.modules()]:
        for name, value in vars(part).items():
            if ('dropout' in name or 'pdrop' in name) and type(value) in (int, float):
                setattr(part, name, 0.0)
        if isinstance(part, torch.nn.Dropout):
            part.p = 0.0


def enable_checkpointing(model, source):
    """The HF model's own activation checkpointing (renamed in transformers 5), non-reentrant; before DeepSpeed wraps
    the model."""
    try:
        if hasattr(model, 'activation_checkpointing_enable'):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    except ValueError as e:  # a family without checkpointing support
        raise ValueError(f"gradient_checkpointing=True: {e} (model '{source}'); set gradient_checkpointing=False") from None


def frozen(m, source, role, vocab_size, device, dtype, digest=False, zero3_config=None):
    """A loaded model as the frozen reference/teacher: the policy's vocab, no gradients, eval mode. digest: its
    weights_digest as m.bipost_weights (the precomputed reference's fingerprint), taken before ZeRO-3 partitions it.
    zero3_config: partitioned like the policy by a forward-only DeepSpeed engine; else on device in dtype."""
    if m.get_output_embeddings().weight.shape[0] != vocab_size:
        raise ValueError(f"{role} '{source}' has vocab {m.get_output_embeddings().weight.shape[0]} but the policy has "
                         f"{vocab_size}: the {role} must share the policy's tokenizer")
    m.requires_grad_(False).eval()
    if digest:
        m.bipost_weights = weights_digest(m)
    if zero3_config:
        import deepspeed
        return deepspeed.initialize(model=m, config=zero3_config)[0].module
    return m.to(device, dtype)
