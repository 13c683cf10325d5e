"""
bipost: one-stage bi-objective (and bilevel) LLM post-training, e.g. SFT + DPO in one run.

    python bipost.py                                               # the CPU demo: ~30 s on 2 quiet cores
    python bipost.py config/demo.py --strategy=maxright --out_dir=out-maxright  # a recipe, plus overrides
    torchrun --nproc_per_node=8 bipost.py config/llama3_dpo_sft.py # 8 GPUs, DeepSpeed ZeRO-3

One launch path: plain python or torchrun; the only branch is whether RANK is in the environment.
"""
import gc
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # else DeepSpeed, imported with transformers' integrations, warns it found no GPU
    os.environ.setdefault('DS_ACCELERATOR', 'cpu')
from configurator import configure, ConfigError
from config_checks import check_settings, demo_defaults_note
from checkpoint import resume_config, read_checkpoint, resumed_policy, resume, restart_metrics, save_checkpoint
from objectives import OBJECTIVES, DATA_KIND, NEEDS_REFERENCE
import rl
import reward_model
from reference_cache import precompute
import memory_plan
import run_log
from selector import ObjectiveSelector, DataSelector, optimum_record, read_optimum, write_optimum
import coreset as coresets  # `coreset` is a config key
from data.loader import check_fits, check_tokenizer, run_splits
from data.prepare import DataError
from held_out import estimate, evaluate
import ranks

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out-demo'          # checkpoint, HF export, metrics.jsonl
eval_interval = 50            # updates between held-out evals (and checkpoints)
eval_iters = 0                # held-out batches per rank per objective per eval; 0 = the whole val split
log_interval = 1              # updates between log lines
eval_only = False             # evaluate once and exit
always_save_checkpoint = True # save every eval (else only at the end)
save_checkpoints = True       # False: no checkpoint and no HF export at all (benchmarks): the run cannot be resumed
init_from = 'scratch'         # 'scratch' (LlamaConfig from the globals below) | 'resume' | a local HF model dir
overwrite = False             # True: a fresh run may replace the checkpoint in out_dir
export_hf = True              # write out_dir/hf, loadable by transformers.AutoModelForCausalLM
wandb_log = False             # optional; imported lazily
wandb_project = 'bipost'
wandb_run_name = 'demo'
# data
dataset = 'demo'              # data/<dataset>/ as written by data/prepare.py
train_splits = {'sft': 'sft_train', 'dpo': 'pref_train', 'kd': 'sft_train', 'rl': 'rl_train', 'simpo': 'pref_train',
                'cpo': 'pref_train', 'orpo': 'pref_train', 'kto': 'kto_train', 'rm': 'pref_train'}  # split each objective trains on
val_splits = {'sft': 'sft_val', 'dpo': 'pref_val', 'kd': 'sft_val', 'rl': 'rl_val', 'simpo': 'pref_val',
              'cpo': 'pref_val', 'orpo': 'pref_val', 'kto': 'kto_val', 'rm': 'pref_val'}  # held-out split it is judged on
keep_list = ''                # a keep.npy from the data selector: train only on those examples
keep_objective = 'sft'        # the objective whose train split keep_list indexes
batch_size = 16               # micro-batch per rank: sequences for sft/kd, pairs for dpo, prompts for rl
gradient_accumulation_steps = 1  # micro-batches per update per rank
total_batch_size = 0          # if > 0: examples per update over all ranks; sets gradient_accumulation_steps for any world size
max_tokens_per_batch = 0      # > 0: micro-batches filled up to this many tokens, not batch_size examples (docs/packing.md)
# model ('scratch' only; HF dirs bring their own config)
n_layer = 2
n_head = 4
n_embd = 128
block_size = 128              # max positions of a scratch model; prepared data never exceeds it
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
disable_dropout = True        # sets every dropout probability of the policy (and θ̂ copy) to 0: TRL's default; False keeps the model's own
# objectives
objectives = ['sft', 'dpo']   # names from objectives.OBJECTIVES; 2 or more
beta = 5.0                    # DPO temperature: ~0.05-0.5 on summed log-probs, ~2-10 length-normalized
dpo_loss = 'sigmoid'          # TRL's loss_type: 'sigmoid' (DPO; label_smoothing > 0: conservative) | 'ipo' | 'hinge' | ...
                              # (docs/preference-losses.md), or a weighted sum 'sigmoid,bco_pair,sft' (MPO)
dpo_loss_weights = []         # one weight per dpo_loss term; [] = 1 each
discopop_tau = 0.05           # τ of dpo_loss 'discopop', ~0.05
ld_alpha = 1.0                # LD-DPO: weight of the longer response's tokens past the shorter one's length, 0-1 (1 = off)
label_smoothing = 0.0         # ε of conservative DPO (and of robust, exo_pair, aot, simpo, cpo), 0-0.5
simpo_gamma = 0.5             # objective simpo: its target margin γ (TRL's simpo_gamma), ~0.5-1.6 with β ~2-2.5
cpo_alpha = 1.0               # objective cpo: weight of its NLL term on the chosen responses, 0-1
desirable_weight = 1.0        # objective kto: λ_D on desirable examples; keep λ_D·n_D / (λ_U·n_U) in ~[1, 4/3]
undesirable_weight = 1.0      # objective kto: λ_U on undesirable examples
length_normalize = True       # mean instead of sum of response log-probs (Tulu 3); see config/demo.py
dpo_nll_weight = 0.0          # weight of an NLL term on the chosen response (RPO), 0-1
rm_center_coefficient = 0.0   # rm: + c·(r_chosen + r_rejected)² per pair (TRL's center_rewards_coefficient), ~0.01; 0 = off
reference_from = ''           # '' = the initial policy, loaded again from init_from; or a local HF dir
reference_logps = 'live'      # 'live': the reference runs beside the policy | 'precompute': once over the preference
                              # splits before training, cached in out_dir/reference_logps.npz, then freed (Tulu 3)
teacher_from = ''             # local HF dir of the frozen KD teacher
fused_kernels = True          # Triton log-prob/DPO kernels on GPU; CPU always uses the PyTorch twins
packing = True                # each micro-batch's examples laid end to end, no padding, the same numbers (docs/packing.md); off with one line where inexact
sft_grads_in_forward = True   # SFT: the LM head's gradients computed in its forward pass (3 GEMMs, not 4; as exact)
gradient_checkpointing = False # True: each layer's activations recomputed in backward (non-reentrant): ~1/3 more compute, far less activation memory
lora_rank = 0                 # > 0: train LoRA adapters of this rank (~8-64; needs peft), the reference is the model with them off; 0 = full fine-tuning
lora_alpha = 16               # LoRA scale: the adapters add (lora_alpha / lora_rank)·B·A; ~lora_rank to 2·lora_rank
lora_dropout = 0.0            # dropout on the adapters' input, 0-0.1 (kept even with disable_dropout)
lora_targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj']  # names of the modules that get adapters (peft target_modules); not the LM head
# reinforcement learning (objective 'rl', rl.py): prompts from a 'prompt' split, rl_group sampled completions each
rl_group = 8                  # G: completions per prompt, 4-16 (>= 2 unless ppo)
rl_max_new_tokens = 64        # completion budget in tokens; a completion ends at EOS (or the template's end of turn) or here
rl_temperature = 1.0          # sampling temperature, 0.6-1.2 (evals decode greedily)
rl_top_p = 1.0                # nucleus sampling, 0.9-1 (no top-k)
rl_reward = 'verify_number'   # rewards.py: 'verify_number' | 'exact' | 'normalized' | 'format' | 'math' | 'ifeval'; a local reward-model dir; 'module:function'
rl_reward_scale = 10.0        # α: reward = α·score, so α for a verified answer, else 0 (Tulu 3: 10)
rl_advantage = 'group_std'    # 'group' (r − group mean) | 'group_std' (/ group std: GRPO) | 'batch_std' (/ the update's std) | 'loo' | 'ppo' (value head, GAE); TRL scale_rewards group/batch/none = group_std/batch_std/group
rl_whiten = False             # advantages to mean 0, std 1 over the micro-batch's completion tokens (usual with ppo)
rl_clip = 0.2                 # ε of the clipped ratio (and of ppo's value clip), 0.1-0.3 (TRL: epsilon)
rl_epsilon_high = 0.0         # DAPO's clip-higher: the ratio's upper bound is 1 + this (TRL: epsilon_high); 0: rl_clip; ~0.28
rl_importance_sampling_level = 'token'  # 'token' | 'sequence' (GSPO: one ratio per completion, exp of its mean log-ratio)
rl_overlong_cache = 0         # DAPO's soft overlong punishment: the reward falls by up to α over the last this many tokens of rl_max_new_tokens (TRL soft_punish_cache); 0: off
rl_mask_truncated_completions = False  # DAPO's overlong filtering: a completion without EOS in rl_max_new_tokens gets no loss
rl_use_bias_correction_kl = False  # TRL's k3 × importance ratio (unbiased off-policy: rl_epochs > 1); off as in TRL
rl_kl = 0.04                  # β_kl of the k3 KL penalty to the reference, 0-0.1 (0: no reference loaded)
rl_kl_in_reward = False       # ppo: the KL as per-token rewards −β_kl·(log π − log π_ref) (InstructGPT), not k3 in the loss
rl_reward_norm = False        # advantages from (reward − running mean) / running std of all rewards so far (a reward model's scale)
rl_loss_norm = 'bnpo'         # 'bnpo' micro-batch token mean | 'dapo' token mean over the update, all ranks | 'grpo' per-completion mean, then mean | 'dr_grpo' token sum / (G·B·max_new_tokens)
rl_epochs = 1                 # updates per rollout batch (PPO's inner epochs), 1-4
rl_ema = 0.0                  # 0: fixed reference; α in (0, 1): π_ref ← α·π_ref + (1−α)·π after every update (~0.99)
rl_gamma = 1.0                # ppo: GAE discount, 0.99-1
rl_lam = 0.95                 # ppo: GAE λ, 0.9-1
# selector (objectives)
strategy = 'alright'          # 'sequential' | 'mix' | 'alright' | 'maxright'
weights = [0.5, 0.5]          # λ per objective (sum 1); sequential gives objective i a λ_i share of max_iters
optima = []                   # f* per objective, for maxright and the ideal distance: a number, or the out_dir of a
                              # run on that objective alone (its optimum.json); [] = unknown: no ideal distance
maxright_refresh = 10         # maxright: re-estimate every objective every k updates
# selector (data): bilevel per-example weights learned against a small trusted set (docs/data-selection.md)
data_selection = False        # learn weights for selection_objective's train split -> out_dir/{weights,ranking,keep}.npy
selection_objective = 'sft'   # whose train split gets weights: 'sft' (examples) or 'dpo' (pairs)
trusted_split = 'sft_trusted' # small clean split of the same kind (~100-1000 examples)
selector_weights = 'softmax'  # 'softmax': w = N·softmax(ω), mean 1 | 'sigmoid': w = 2·sigmoid(ω)
selector_lr = 16.0            # SGD lr of the logits ω; ~ the global batch (a batch mean divides each gradient by it)
lower_level = 'copy'          # θ̂: 'copy' (policy copy, Adam on the weighted loss) | 'reference' (frozen) | 'none'
lower_lr = 1e-3               # Adam lr of the copy θ̂; about learning_rate
trusted_weight = 0.8          # c0: share of the trusted loss in the model's loss, 0-1
trusted_decay = 0.5           # c = c0 · trusted_decay^epoch
keep_fraction = 0.8           # keep.npy holds the top fraction by weight
example_weights = ''          # a weights.npy (coreset or data selector): per-example loss weights of keep_objective's split
# coreset (coreset.py, docs/coresets.md): a weighted subset of keep_objective's train split from gradient features, then exit
coreset = ''                  # '' (train) | 'brief' | 'craig' | 'random' -> out_dir/{weights,keep,ranking}.npy, coreset.json
coreset_fraction = 0.05       # γ in (0, 1]: K = ⌈γ·N⌉ examples
coreset_dim = 8192            # random projection of the gradients (8192 in the BRIEF paper; ~512 for the demo)
coreset_params = 'last'       # gradients over 'last' (last layer, final norm, head) | 'trainable' (requires_grad: LoRA adapters)
coreset_adam = ''             # out_dir of a plain-torch warm-up run: features at its weights, Adam-preconditioned; '' = plain
coreset_features = ''         # coreset_features.pt of an earlier pass over the same split: select again without the model
coreset_tolerance = 0.005     # golden-section precision on α (at most 15 evaluations)
coreset_partition = 0         # > 0: one greedy per random part of at most this many examples (pools too large for one)
# optimizer
learning_rate = 1e-3          # peak lr; ~1e-6-1e-5 for 8B models
max_iters = 300               # total optimizer updates
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 disables
warmup_iters = 20
decay_lr = True               # cosine decay to min_lr at max_iters
min_lr = 1e-4
# deepspeed
deepspeed = False             # False: plain torch (gradients all-reduced by hand under torchrun)
zero_stage = 2                # 0-3
offload = False               # ZeRO-Offload optimizer state to CPU
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
seed = 1337
peak_flops = 0.0              # bf16 FLOP/s of one GPU for the log line's MFU; 0 = from the GPU's name (memory_plan.PEAK_BF16)
nonfinite = 'stop'            # non-finite loss: 'stop' (nothing written) | 'skip' (drop that micro-batch, counted)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()  # not the imported constants (OBJECTIVES, DATA_KIND)
               if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str, list, dict))]
config = {k: globals()[k] for k in config_keys}

if {'-h', '--help'} & set(sys.argv[1:]):  # the block of globals above, as written: each is a key, with its comment
    block = open(__file__, encoding='utf-8').read().split('\n# ' + '-' * 77 + '\n')[1]
    print(__doc__.strip() + "\n\nEvery global below is a key, set in a config file or as --key=value:\n\n" + block)
    sys.exit(0)
try:
    _defaults = dict(config)
    configure(config, sys.argv[1:])
    if config['init_from'] == 'resume':  # before anything else reads the config
        config = resume_config(config['out_dir'], _defaults, sys.argv[1:])
except ConfigError as e:  # a typo gets one line, not a traceback
    sys.exit(f"bipost: error: {e}")
globals().update(config)
# -----------------------------------------------------------------------------

def fail(message):
    """Bad input ends the run with one actionable line, before anything is written."""
    print(f"bipost: error: {message}", file=sys.stderr)
    sys.exit(1)

if init_from != 'resume' and not overwrite and not eval_only and os.path.exists(os.path.join(out_dir, 'ckpt.json')):
    fail(f"out_dir={out_dir} holds a checkpoint that this fresh run (init_from={init_from!r}) would replace: "
         f"--init_from=resume to continue it, --overwrite=True to start over, or another out_dir")

# distributed: torchrun sets RANK; plain python is a world of one. The GPU is set before the process group exists
rank, local_rank, world_size, device = ranks.join(device, deepspeed)  # + deepspeed.init_distributed() under deepspeed
master = rank == 0
distributed = world_size > 1
torch.manual_seed(seed)
try:  # every choice and combination of settings, before any data or model is read (config_checks.py)
    config['gradient_accumulation_steps'] = gradient_accumulation_steps = check_settings(config, world_size)
except ValueError as e:
    fail(str(e))
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
reference_needed = any(n in NEEDS_REFERENCE for n in objectives) or (data_selection and lower_level == 'reference') \
    or ('rl' in objectives and rl_kl > 0)

# -----------------------------------------------------------------------------
# data: token bins + index arrays written by data/prepare.py; training never tokenizes

try:
    data_dir, meta, train_data, val_data = run_splits(config, DATA_KIND, rank, world_size, device)
    meta_path = os.path.join(data_dir, 'meta.json')
    for role, source in (('policy', init_from), ('reference', reference_from if reference_needed else ''),
                         ('teacher', teacher_from if 'kd' in objectives else '')):
        if (note := check_tokenizer(meta, meta_path, source, role)) and master:  # every model reads the data's ids
            print(note)
    example_weight = coresets.load_example_weights(example_weights, train_data[keep_objective], device) \
        if example_weights else None  # mean 1 over the examples trained on (the keep_list's, if any)
except DataError as e:
    fail(str(e))
if 'rl' in objectives:  # the RL objective's settings and reward function (rl.py, rewards.py), before any model loads
    try:
        rl_context = rl.settings(config, meta, rank, device, deepspeed and zero_stage == 3 and world_size > 1,
                                 [train_data['rl'], val_data['rl']])
    except ValueError as e:
        fail(f"{e} (config keys rl_*)")

def eval_examples(name):
    n = len(val_data[name].index)
    return n if eval_iters == 0 else min(n, eval_iters * batch_size * world_size)


def comparable(name):  # what makes a held-out loss of objective name comparable with an f* (selector.py)
    return optimum_record(name, config, val_data[name], eval_examples(name))

try:
    optimum_values = [read_optimum(n, o, comparable(n)) for n, o in zip(objectives, optima)] if optima else None
except ValueError as e:
    fail(str(e))
if master and (note := demo_defaults_note(config, data_dir)):
    print(note)
try:  # strategy, weights and optima are checked before any model is loaded
    selector = ObjectiveSelector(objectives, weights, strategy, max_iters, optimum_values, maxright_refresh, seed)
except ValueError as e:
    fail(f"{e} (config keys objectives, strategy, weights, optima)")

# -----------------------------------------------------------------------------
# models: the policy, and the frozen reference (DPO) / teacher (KD), each loaded on its own

from model import load_model, check_vocab, drop_dropout, enable_checkpointing, frozen, add_lora, packing_checked

try:  # the pointer ckpt.json and plain torch's ckpt.pt of a resumed run (whose config resume_config read), else None
    checkpoint, state = read_checkpoint(out_dir, init_from == 'resume', master, world_size)
except ValueError as e:
    fail(str(e))
policy_source = checkpoint['policy_init'] if checkpoint else init_from


def built(step, *args, **kwargs):  # one step of model.py: its ValueError (bad input) is the run's one-line error
    try:
        return step(*args, **kwargs)
    except ValueError as e:
        fail(str(e))


def load(source):
    return built(load_model, source, meta, seed, n_layer, n_head, n_embd, block_size)

# a resume takes every weight from the checkpoint; LoRA's frozen base comes from its source, as the reference does
model = resumed_policy(checkpoint, state) if checkpoint and not lora_rank else load(policy_source)
if disable_dropout:
    drop_dropout(model)
if 'rl' in objectives and rl_advantage == 'ppo':  # PPO's value head: a submodule of the policy, so that the optimizer,
    model.value_head = rl.value_head(model, state)  # the checkpoint and ZeRO take it along; the HF export leaves it out
vocab_size = built(check_vocab, model, policy_source, meta, meta_path)
packing = config['packing'] = packing and packing_checked(model, policy_source, master)  # fp32, before LoRA / DeepSpeed
try:
    check_fits([*train_data.values(), *val_data.values()], getattr(model.config, 'max_position_embeddings', None),
               vocab_size, data_dir, rl_max_new_tokens)
except DataError as e:
    fail(str(e))
model.config.use_cache = False
if gradient_checkpointing:
    built(enable_checkpointing, model, policy_source)
if lora_rank:  # the checkpoints hold the adapters alone
    model, adapters_off = built(add_lora, model, lora_rank, lora_alpha, lora_dropout, lora_targets,
                        digest=reference_logps == 'precompute')
    if checkpoint and checkpoint['format'] == 'torch':
        model.load_state_dict(state['model'], strict=False)
if 'rm' in objectives:  # the reward head (reward_model.py), trained beside the body or its adapters
    built(reward_model.attach, model, state, export_hf)
if not deepspeed:
    model.to(device)  # fp32 master weights; bf16 compute through autocast
# the reference computes exactly as the policy does, so that at step 0 every pair's margin is exactly 0: under
# DeepSpeed the engine holds the policy in the training dtype; plain torch keeps fp32 weights under autocast
frozen_setup = dict(vocab_size=vocab_size, device=device, dtype=ptdtype if deepspeed else torch.float32, packing=packing,
                    zero3_batch=batch_size if deepspeed and zero_stage == 3 else 0)  # ZeRO-3: partitioned like the policy
reference = None
if reference_needed:
    source = reference_from or policy_source
    reference = adapters_off if lora_rank and not reference_from else \
        built(frozen, load(source), source, 'reference', digest=reference_logps == 'precompute', **frozen_setup)
teacher = built(frozen, load(teacher_from), teacher_from, 'teacher', **frozen_setup) if 'kd' in objectives else None
# what the objectives read: every setting by its config name (rl's resolved ones too), the frozen models, the pad id
ctx = SimpleNamespace(**config, reference=reference, teacher=teacher, reference_cache=None, pad_id=meta['pad_id'],
                      grads_in_forward=sft_grads_in_forward and not data_selection)
ctx.__dict__.update(rl_context if 'rl' in objectives else {})
# plain torch: fp32 master weights, matmuls in dtype through autocast (CPU too); DeepSpeed casts the model itself
autocast = torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=not deepspeed and dtype != 'float32')

if reference_logps == 'precompute' and reference is not None:
    ctx.reference_cache = precompute(reference, [*train_data.values(), *val_data.values()], reference_from or
                                     policy_source, ctx, config, device, autocast, master)  # the preference splits'
    reference = ctx.reference = None  # never loaded again (the last reference to it: memory_plan sees it gone)
    gc.collect()
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
data_selector = DataSelector(  # before deepspeed.initialize: θ̂ is a copy of the plain module
    len(train_data[selection_objective].index), OBJECTIVES[selection_objective], model, selector_weights, selector_lr,
    lower_level, lower_lr, trusted_weight, trusted_decay, device) if data_selection else None

if coreset:  # coreset mode: features of keep_objective's train split, the selection, its files; then exit
    try:
        coresets.run(config, model, train_data[keep_objective], meta['eos_id'], rank, world_size, master)
    except ValueError as e:
        fail(str(e))
    ranks.leave()
    sys.exit(0)

# -----------------------------------------------------------------------------
# optimizer: explicit DeepSpeed, or plain torch

micro_steps = gradient_accumulation_steps * (len(objectives) if strategy == 'mix' else 1)
trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
decay = [p for p in trained if p.dim() >= 2]
no_decay = [p for p in trained if p.dim() < 2]
groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
if deepspeed:
    import deepspeed as ds
    ds_config = {
        'train_micro_batch_size_per_gpu': batch_size,
        'gradient_accumulation_steps': micro_steps,  # mix runs one micro-step per objective
        'train_batch_size': batch_size * micro_steps * world_size,
        'gradient_clipping': grad_clip,
        'bf16': {'enabled': dtype == 'bfloat16'},
        'fp16': {'enabled': dtype == 'float16'},
        'zero_optimization': {'stage': zero_stage, 'overlap_comm': device.startswith('cuda'),
                              **({'offload_optimizer': {'device': 'cpu'}} if offload else {})},
        # torch's AdamW (fused on GPUs): no DeepSpeed op to compile; offload needs DeepSpeed's CPU Adam (compiled)
        'optimizer': {'type': 'AdamW', 'params': {'lr': learning_rate, 'betas': [beta1, beta2], 'eps': 1e-8,
                                                  'weight_decay': weight_decay, 'torch_adam': not offload,
                                                  **({'fused': True} if device.startswith('cuda') and not offload else {})}},
        'steps_per_print': 10 ** 9,
    }
    if master:
        print('deepspeed config:', json.dumps(ds_config))
    engine, optimizer, _, _ = ds.initialize(model=model, model_parameters=groups, config=ds_config)
    raw_model = engine.module
else:
    engine, raw_model = None, model
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2),
                                  fused=device.startswith('cuda'))
    if distributed:  # one broadcast so every rank starts from rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.data, 0)

# -----------------------------------------------------------------------------
# checkpoints (checkpoint.py): atomic (stage, commit, publish), resumable exactly (data cursors, selector and RNG state)

run = SimpleNamespace(out_dir=out_dir, master=master, config=config, policy_source=policy_source, meta_path=meta_path,
                      deepspeed=deepspeed, zero3=deepspeed and zero_stage == 3, lora=lora_rank > 0, export_hf=export_hf,
                      engine=engine, optimizer=optimizer, raw_model=raw_model, selector=selector,
                      data_selector=data_selector, keep_fraction=keep_fraction, train_data=train_data, device=device,
                      world_size=world_size, rl_reward_stats=getattr(ctx, 'rl_reward_stats', None))
iter_num, skipped = resume(run, checkpoint, state) if checkpoint else (0, 0)  # updates taken, micro-batches skipped
del state  # plain torch: ckpt.pt's tensors, loaded into the model and optimizer
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
for path in (metrics_path, os.path.join(out_dir, rl.SAMPLES_FILE)):
    if master and not eval_only and os.path.exists(path):  # as if never stopped (fresh: started over)
        restart_metrics(path, checkpoint, iter_num)
if checkpoint and master:
    print(f"resumed from {out_dir} at update {iter_num}, with the config saved there" +
          (f"; it is done (max_iters={max_iters}): --max_iters=N to train on" if iter_num >= max_iters else ''))

# -----------------------------------------------------------------------------
# helpers for the loop

def get_lr(it):
    # update t of a run of n updates: lr·(t+1)/(w+1) while t < w (w = warmup_iters), then, with decay_lr,
    # min_lr + ½(1 + cos(π·min(1, (t−w)/max(1, n−w))))·(lr − min_lr). sequential restarts it per stage, as
    # separate runs would: t and n count from the stage's first update (stages end at selector.boundaries).
    start, end = 0, max_iters
    if strategy == 'sequential':
        start = max([0] + [b for b in selector.boundaries if b <= it])
        end = min([max_iters] + [b for b in selector.boundaries if b > it])
    t, n = it - start, end - start
    if t < warmup_iters:
        return learning_rate * (t + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    ratio = min(1.0, (t - warmup_iters) / max(1, n - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def log(record, line):
    if not master:
        return
    print(line, flush=True)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


def zero_loss(batch):
    """A loss with zero gradient for every parameter: stands in for a skipped non-finite micro-batch. Under ZeRO-3 a
    parameter is an empty placeholder outside its module's forward: there the zero is a forward of one token."""
    if deepspeed and zero_stage == 3:
        return raw_model(input_ids=batch['input_ids'][:1, :1]).logits.sum() * 0
    return sum((p.view(-1)[:1] * 0).sum() for p in raw_model.parameters() if p.requires_grad)

# -----------------------------------------------------------------------------
# startup facts

n_params = sum(memory_plan.numel(p) for p in raw_model.parameters())  # ZeRO-3 leaves empty placeholders
peak = memory_plan.peak_flops(torch.cuda.get_device_name(device), peak_flops) if device.startswith('cuda') else None
if master:
    os.makedirs(out_dir, exist_ok=True)
    side = [m for m in (data_selector and data_selector.lower, getattr(getattr(ctx, 'reward', None), 'model', None))
            if m is not None]  # whole fp32 modules beside the policy: the data selector's θ̂, rl's reward model
    run_log.startup_facts(config, raw_model, trained, [m for m in (reference, teacher) if m is not None], train_data,
                          val_data, DATA_KIND, policy_source, vocab_size, world_size, device,
                          gradient_accumulation_steps, optimum_values, n_params, peak, side)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------
# the training loop

t0 = time.time()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        results = evaluate(raw_model, val_data, {n: eval_examples(n) for n in objectives}, batch_size, ctx, autocast,
                           optimum_values)
        log({'iter': iter_num, **results}, run_log.eval_line(iter_num, results, objectives, optimum_values))
        if master and 'rl' in objectives:  # a few greedy held-out completions a user can read
            rl.write_samples(ctx, os.path.join(out_dir, rl.SAMPLES_FILE), iter_num)
        if not all(map(math.isfinite, results.values())):  # diverged weights never overwrite a good checkpoint
            fail(f"non-finite held-out loss at update {iter_num}: the weights diverged and were not saved (the last "
                 f"checkpoint in {out_dir} is intact); check the data, or lower learning_rate in a new run from its weights "
                 f"(--init_from={os.path.join(out_dir, 'hf')}): a resumed run keeps its config")
        if master and len(objectives) == 1:  # a run on one objective alone measures f* for later runs' optima
            write_optimum(out_dir, comparable(objectives[0]), results[f'val/{objectives[0]}/loss'], iter_num,
                          resumed=checkpoint is not None)
        if eval_only:
            break
        if save_checkpoints and iter_num > (checkpoint['iter_num'] if checkpoint else 0) and \
                (always_save_checkpoint or iter_num == max_iters):
            save_checkpoint(run, iter_num, skipped)
        t0 = time.time()  # eval and checkpoint time is not update time
    if iter_num >= max_iters:
        break

    if selector.needs_refresh(iter_num):  # maxright: forward-only estimates of every objective
        for name in objectives:
            ids = train_data[name].next_ids(batch_size, advance=False)
            selector.observe(name, estimate(raw_model, name, train_data[name], [(ids, np.ones(len(ids)))], ctx,
                                            autocast)['loss'])
    chosen = selector.choose(iter_num)

    if deepspeed and zero_stage == 3:  # ZeRO-3 copies gradients in at an update's first micro-step and adds later
        engine.optimizer.grad_partitions_flat_buffer.zero_()  # ones: one first reached later (rm's head) adds to 0
    totals, tokens = {}, 0
    for name, weight in chosen:
        split = train_data[name]
        micro_batches, examples = split.next_update(batch_size, gradient_accumulation_steps)  # examples: over all ranks
        share = examples / (gradient_accumulation_steps * world_size)  # losses are summed / share: each example counts once
        ctx.update_batches = [split.batch(ids) for ids in micro_batches]
        for batch in ctx.update_batches:  # drawn first: rl's generation batch (dapo, batch_std) spans the update
            if deepspeed and zero_stage == 3:  # ZeRO-3 adds this micro-step's gradient to the partitions (not copies it
                # over them) only if told a new forward began, which engine.forward does and the objectives bypass
                getattr(engine.optimizer, 'clear_backward_seen_flag', lambda: None)()  # older DeepSpeed: absent, not needed
            if example_weight is not None and name == keep_objective:  # coreset or data selector weights, known to
                batch['weights'] = example_weight[batch['index']]          # sft, whose head then has its gradient early
            with autocast:
                losses, metrics = OBJECTIVES[name](raw_model, batch, ctx)
                loss = (losses if 'weights' not in batch else batch['weights'] * losses).sum() / share
                if data_selector and name == selection_objective:  # weighted + trusted loss; also steps ω and θ̂
                    trusted = train_data['trusted'].batch(train_data['trusted'].next_ids(batch_size))
                    loss = data_selector.step(losses, batch, trusted, raw_model, ctx, split.epoch)
            finite = ranks.all_sum([float(torch.isfinite(loss))], device)[0] == world_size  # every rank: one branch
            if not finite:
                if nonfinite == 'stop':
                    fail(f"non-finite {name} loss at update {iter_num} (lr {lr:.2e}): stopped before any "
                         f"checkpoint was written; lower learning_rate, check the data, or set nonfinite='skip'")
                skipped += 1
                loss = zero_loss(batch)
            scale = weight * len(chosen)  # mix: the engine divides by micro_steps, which counts every objective
            if deepspeed:
                engine.backward(loss * scale)  # the engine scales by 1/gradient_accumulation_steps itself
                engine.step()                  # every micro-step: the engine updates at the boundary
            else:
                (loss * scale / micro_steps).backward()
            tokens += int(batch['attention_mask'].sum()) if split.kind != 'prompt' else \
                round(rl_group * float(batch['attention_mask'].sum() + metrics['length'].sum()))  # G x (prompt + answer)
            for k, v in {'loss': losses.detach(), **metrics}.items():
                totals[f'{name}/{k}'] = totals.get(f'{name}/{k}', 0.0) + \
                    v.float().mean().item() * len(batch['index']) / share / gradient_accumulation_steps
    if not deepspeed:
        if distributed:  # plain torch across ranks: average the accumulated gradients by hand
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if 'rl' in objectives and rl_ema > 0:  # EMA reference for the KL penalty (Xu et al. 2024)
        rl.update_reference(ctx.reference, raw_model, rl_ema)
    keys = list(totals)  # train metrics: means over every rank's micro-batches; tokens: summed over ranks
    *values, tokens = ranks.all_sum([totals[k] for k in keys] + [tokens], device)
    totals = {k: v / world_size for k, v in zip(keys, values)}
    if strategy == 'maxright':  # the step just taken refreshes the chosen objective's estimate
        selector.observe(chosen[0][0], totals[f'{chosen[0][0]}/loss'])

    t1 = time.time()
    dt, t0 = t1 - t0, t1
    iter_num += 1
    if iter_num % log_interval == 0:
        names = '+'.join(n for n, _ in chosen)
        line, speed = run_log.update_line(iter_num, names, totals, lr, dt, tokens, n_params, peak, world_size, any(
            n in ('dpo', 'kd', 'kto') or n == 'rl' and rl_kl > 0 for n, _ in chosen))
        log({'iter': iter_num, 'objective': names, 'lr': lr, 'ms': dt * 1000, 'tokens': tokens, 'skipped': skipped,
             **speed, **{f'train/{k}': v for k, v in totals.items()}}, line)

ranks.leave()
