"""
What bipost knows of its GPU. The memory plan it prints before the first step: what one GPU holds for the
policy's model states, the frozen reference/teacher and the activations of one micro-batch. Model states come
from DeepSpeed's own estimators, which assume mixed precision (16-bit weights; fp32 master weights, gradients and
AdamW's two moments: 18 bytes a parameter besides the 16-bit copy); the rest is a rough count. Estimates, not
measurements: allocator slack, communication buffers and the CUDA context come on top. Off GPU the same plan is
per process, in CPU memory. And the log line's speeds: the peak FLOP/s its MFU divides by, and its rates printed
with enough digits for a slow CPU run (per_second).
"""

# dense bf16 tensor-core peak FLOP/s (no sparsity) of the SXM parts, by a word of torch.cuda.get_device_name();
# PCIe/NVL parts run lower clocks: set peak_flops for them. The first word found in the name wins.
PEAK_BF16 = {'GH200': 989e12, 'H200': 989e12, 'H100': 989e12, 'H800': 989e12, 'H20': 148e12, 'B200': 2250e12,
             'A100': 312e12, 'A800': 312e12, 'L40S': 362e12, 'A10G': 70e12}


def peak_flops(device_name, override=0.0):
    """The peak bf16 FLOP/s of one GPU: override if > 0, else from PEAK_BF16 by name; None if unknown (no MFU)."""
    if override > 0:
        return float(override)
    return next((flops for word, flops in PEAK_BF16.items() if word in device_name.upper()), None)


def numel(p):
    """Elements of a parameter, also once ZeRO-3 has partitioned it (its data is then an empty placeholder)."""
    return getattr(p, 'ds_numel', p.numel())


def model_states(n_params, largest_layer, deepspeed, zero_stage, gpus, offload):
    """Bytes per GPU of the trained model's weights, gradients and optimizer state. ZeRO-2's estimator serves ZeRO-0
    (one GPU: nothing partitioned) and ZeRO-1 (it counts the 16-bit gradients partitioned: low by 2 bytes/param at
    most). Plain torch: fp32 weights, gradients and two AdamW moments on every GPU, 16 bytes/param."""
    if not deepspeed:
        return 16 * n_params
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        return estimate_zero3_model_states_mem_needs(n_params, largest_layer, num_gpus_per_node=gpus, cpu_offload=offload,
                                                     cpu_offload_params=False)[1]
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs(n_params, num_gpus_per_node=gpus if zero_stage > 0 else 1,
                                                 cpu_offload=offload)[1]


def activations(config, tokens, checkpointing, value_bytes):
    """Rough bytes one micro-batch of `tokens` tokens keeps for the backward of a Llama-like decoder: per token and
    layer ~9·h + 4·i values (h hidden, i MLP width: the two norms' inputs and outputs, q/k/v and the rotated q/k,
    the attention output; the MLP's gate, up, activation and product). Checkpointing keeps each layer's input (h)
    and one layer's full set at a time. The LM head adds no [tokens, vocab] logits: the fused log-prob op."""
    h, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 9 * h + 4 * (getattr(config, 'intermediate_size', None) or 4 * h)
    values = layers * h + per_layer if checkpointing else layers * per_layer
    return tokens * values * value_bytes


def plan(model, frozen, deepspeed, zero_stage, world_size, offload, value_bytes, tokens, checkpointing, gpu=True,
         side=()):
    """The plan as one line, GB per GPU (per process off GPU: gpu=False, the CPU's memory). model: the policy
    (partitioned or not); frozen: the reference/teacher models (16-bit under DeepSpeed, fp32 under plain torch,
    partitioned by ZeRO-3); tokens: the largest micro-batch. Model states count the trained parameters; the policy's
    frozen ones (LoRA's base) count as frozen weights. side: plain fp32 modules beside DeepSpeed, whole on every rank
    (the data selector's θ̂ copy, trained by Adam: 16 bytes/param; RL's reward model: 4)."""
    params = list(model.parameters())
    trained = sum(numel(p) for p in params if p.requires_grad)
    largest_layer = max(sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    states = model_states(trained, largest_layer, deepspeed, zero_stage, world_size, offload)
    shards = world_size if deepspeed and zero_stage == 3 else 1
    n_frozen = sum(numel(p) for p in params if not p.requires_grad) + sum(numel(p) for m in frozen for p in m.parameters())
    frozen_bytes = n_frozen * (value_bytes if deepspeed else 4) / shards
    acts = activations(model.config.get_text_config(), tokens, checkpointing, value_bytes)
    side_bytes = sum((16 if p.requires_grad else 4) * numel(p) for m in side for p in m.parameters())
    engine = ('plain torch, 16 B/param' if not deepspeed else "DeepSpeed's ZeRO-3 estimator" if zero_stage == 3 else
              f"DeepSpeed's ZeRO-2 estimator{', nothing partitioned' if zero_stage == 0 else ''}")
    gb = lambda x: f"{x / 1e9:.3g} GB"
    unit, units = ('GPU', 'GPUs') if gpu else ('process', 'processes')
    return (f"memory plan per {unit}: model states {gb(states)} ({engine}, {world_size} {units if world_size > 1 else unit}"
            f"{', optimizer offloaded' if deepspeed and offload else ''}) + frozen weights {gb(frozen_bytes)} + "
            f"activations ~{gb(acts)} ({tokens} tokens a micro-batch, checkpointing {'on' if checkpointing else 'off'})"
            f"{f' + side models {gb(side_bytes)} (fp32, whole)' if side else ''}"
            f" = ~{gb(states + frozen_bytes + acts + side_bytes)}")


def per_second(count):
    """A rate for the log line with three significant digits at any speed: '0.52', '312', '18.3k', '1.25M' (a slow
    CPU run's 312 tokens/s is not '0.3k')."""
    if count >= 999.5e3:
        return f"{count / 1e6:.3g}M"
    if count >= 999.5:
        return f"{count / 1e3:.3g}k"
    return f"{count:.3g}"
