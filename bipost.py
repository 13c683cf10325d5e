"""
bipost: one-stage bi-objective (and bilevel) LLM post-training, e.g. SFT + DPO in one run.

    python bipost.py                                               # the CPU demo: ~30 s on 2 quiet cores
    python bipost.py config/demo.py --strategy=maxright            # a recipe, plus overrides
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

from configurator import configure, ConfigError
from checkpoint import resume_config, finish_publish, read_checkpoint, resume, restart_metrics, \
    save_checkpoint
from objectives import OBJECTIVES, DATA_KIND
import rl
from reference_cache import load_or_compute, reference_pass
import memory_plan
from selector import ObjectiveSelector, DataSelector, optimum_record, read_optimum, write_optimum
import coreset as coresets  # `coreset` is a config key
from data.loader import Split, check_meta, check_tokenizer, load_meta, resolve_dataset
from data.prepare import DataError

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
train_splits = {'sft': 'sft_train', 'dpo': 'pref_train', 'kd': 'sft_train', 'rl': 'rl_train'}  # split each objective trains on
val_splits = {'sft': 'sft_val', 'dpo': 'pref_val', 'kd': 'sft_val', 'rl': 'rl_val'}          # held-out split it is judged on
keep_list = ''                # a keep.npy from the data selector: train only on those examples
keep_objective = 'sft'        # the objective whose train split keep_list indexes
batch_size = 16               # micro-batch per rank: sequences for sft/kd, pairs for dpo, prompts for rl
gradient_accumulation_steps = 1  # micro-batches per update per rank
total_batch_size = 0          # if > 0: examples per update over all ranks; sets gradient_accumulation_steps for any world size
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
dpo_loss = 'sigmoid'          # 'sigmoid' (DPO; with label_smoothing > 0 the conservative variant) | 'ipo'
label_smoothing = 0.0         # ε of conservative DPO, 0-0.5
length_normalize = True       # mean instead of sum of response log-probs (Tulu 3); see config/demo.py
dpo_nll_weight = 0.0          # weight of an NLL term on the chosen response (RPO), 0-1
reference_from = ''           # '' = the initial policy, loaded again from init_from; or a local HF dir
reference_logps = 'live'      # 'live': the reference runs beside the policy | 'precompute': once over the preference
                              # splits before training, cached in out_dir/reference_logps.npz, then freed (Tulu 3)
teacher_from = ''             # local HF dir of the frozen KD teacher
fused_kernels = True          # Triton log-prob/DPO kernels on GPU; CPU always uses the PyTorch twins
sft_grads_in_forward = True   # SFT: the LM head's gradients computed in its forward pass (3 GEMMs, not 4; as exact)
gradient_checkpointing = False # True: each layer's activations recomputed in backward (non-reentrant): ~1/3 more compute, far less activation memory
lora_rank = 0                 # > 0: train LoRA adapters of this rank (~8-64; needs peft), the reference is the model with them off; 0 = full fine-tuning
lora_alpha = 16               # LoRA scale: the adapters add (lora_alpha / lora_rank)·B·A; ~lora_rank to 2·lora_rank
lora_dropout = 0.0            # dropout on the adapters' input, 0-0.1 (kept even with disable_dropout)
lora_targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj']  # names of the modules that get adapters (peft target_modules); not the LM head
# reinforcement learning (objective 'rl', rl.py): prompts from a 'prompt' split, rl_group sampled completions each
rl_group = 8                  # G: completions per prompt, 4-16 (>= 2 unless ppo)
rl_max_new_tokens = 64        # completion budget in tokens; a completion ends at EOS or here
rl_temperature = 1.0          # sampling temperature, 0.6-1.2 (evals decode greedily)
rl_top_p = 1.0                # nucleus sampling, 0.9-1 (no top-k)
rl_reward = 'verify_number'   # rewards.py: 'verify_number' | 'exact' | 'normalized' | 'format'; a local reward-model dir; 'module:function'
rl_reward_scale = 10.0        # α: reward = α·score, so α for a verified answer, else 0 (Tulu 3: 10)
rl_advantage = 'group_std'    # 'group' (r − group mean) | 'group_std' (/ group std: GRPO) | 'loo' (leave-one-out) | 'ppo' (value head, GAE)
rl_whiten = False             # advantages to mean 0, std 1 over the micro-batch's completion tokens (usual with ppo)
rl_clip = 0.2                 # ε of the clipped ratio (and of ppo's value clip), 0.1-0.3
rl_kl = 0.04                  # β_kl of the k3 KL penalty to the reference, 0-0.1 (0: no reference loaded)
rl_loss_norm = 'bnpo'         # 'bnpo'/'dapo' token mean | 'grpo' per-completion mean, then mean | 'dr_grpo' token sum / (G·B·max_new_tokens)
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
# selector (data): bilevel per-example weights learned against a small trusted set (README, data selection)
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
# coreset (coreset.py, README): a weighted subset of keep_objective's train split from gradient features, then exit
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

if {'-h', '--help'} & set(sys.argv[1:]):
    print(__doc__ + "\nEvery global at the top of bipost.py (with its comment) is a key, set in a config file or as "
          "--key=value.\n" + '\n'.join(f"  {k} = {v!r}" for k, v in config.items()))
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

# distributed: torchrun sets RANK; plain python is a world of one
ddp = 'RANK' in os.environ
if deepspeed and not ddp:  # DeepSpeed wants a process group even for one process
    os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=os.environ.get('MASTER_PORT', str(29500 + os.getpid() % 1000)))
rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in (('RANK', 0), ('LOCAL_RANK', 0), ('WORLD_SIZE', 1)))
master = rank == 0
if device.startswith('cuda'):
    device = f'cuda:{local_rank}'
    torch.cuda.set_device(device)
backend = 'nccl' if device.startswith('cuda') else 'gloo'
if deepspeed:
    import deepspeed as ds
    ds.init_distributed(dist_backend=backend)
elif ddp:
    dist.init_process_group(backend=backend)
distributed = dist.is_available() and dist.is_initialized() and world_size > 1

def all_sum(values):
    """Sum a list of floats over ranks (every rank gets the same numbers)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def all_mean(values):
    return [v / world_size for v in all_sum(values)]

torch.manual_seed(seed)
for key, allowed in (('dtype', ('float32', 'bfloat16', 'float16')), ('nonfinite', ('stop', 'skip')), ('dpo_loss', ('sigmoid', 'ipo')),
                     ('reference_logps', ('live', 'precompute')), ('coreset', ('', 'brief', 'craig', 'random')),
                     ('coreset_params', ('last', 'trainable'))):
    if config[key] not in allowed:
        fail(f"{key}={config[key]!r} is not one of {allowed}")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
for name in objectives:
    if name not in OBJECTIVES:
        fail(f"objectives: unknown objective '{name}'; known: {sorted(OBJECTIVES)} (add one in objectives.py)")
if total_batch_size:  # the same recipe on any number of GPUs: the accumulation absorbs the world size
    if total_batch_size % (batch_size * world_size):
        fail(f"total_batch_size={total_batch_size} is not divisible by batch_size {batch_size} x {world_size} ranks: "
             f"use a multiple of {batch_size * world_size}, or another batch_size")
    config['gradient_accumulation_steps'] = gradient_accumulation_steps = total_batch_size // (batch_size * world_size)
if batch_size < 1 or gradient_accumulation_steps < 1:
    fail(f"batch_size={batch_size} and gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")
if not (math.isfinite(learning_rate) and 0 < learning_rate <= 1 and 0 <= min_lr <= learning_rate):
    fail(f"learning_rate={learning_rate} and min_lr={min_lr}: need 0 < learning_rate <= 1 and 0 <= min_lr <= learning_rate "
         f"(~1e-6-1e-5 for billion-parameter models, ~1e-3 for the demo)")
if dpo_loss == 'ipo' and label_smoothing > 0:
    fail(f"label_smoothing={label_smoothing} has no meaning for dpo_loss='ipo' (it is conservative DPO's ε): set one of them")
if data_selection and lower_level == 'reference' and DATA_KIND.get(selection_objective) == 'pref':
    fail("data_selection: lower_level='reference' with preference pairs scores every pair against the reference "
         "itself (log 2 each), which is exactly lower_level='none': use 'copy' or 'none'")
if coreset and not (0 < coreset_fraction <= 1 and coreset_dim >= 1 and DATA_KIND.get(keep_objective) == 'sft'
                    and not deepspeed and not keep_list):
    fail(f"coreset={coreset!r} needs 0 < coreset_fraction <= 1 (got {coreset_fraction}), coreset_dim >= 1, an SFT "
         f"keep_objective (got {keep_objective!r}), deepspeed=False (one plain-torch pass) and keep_list=''")
if example_weights and data_selection:
    fail("example_weights and data_selection both weight the training examples: set one of them")
if data_selection and lower_level == 'reference' and reference_logps == 'precompute':
    fail("reference_logps='precompute' frees the reference, but data_selection's lower_level='reference' runs it as θ̂ "
         "during training: set lower_level='copy' or 'none', or reference_logps='live'")

# -----------------------------------------------------------------------------
# data: token bins + index arrays written by data/prepare.py; training never tokenizes

try:
    data_dir = resolve_dataset(dataset)  # 'demo' is data/demo; a directory path (data/demo/, /abs/dir) works too
    meta_path = os.path.join(data_dir, 'meta.json')
    meta = load_meta(data_dir)
    check_meta(meta, meta['vocab_size'], meta_path)  # ids < the data's vocab <= the model's (check_vocab below)
    if (note := check_tokenizer(meta, meta_path, init_from)) and master:  # the policy's tokenizer made the data
        print(note)
    keep = None
    if keep_list:
        if not os.path.exists(keep_list):
            raise DataError(f"keep_list {keep_list} not found: run the data selector first (README, data selection)")
        keep = np.load(keep_list)

    def make_split(key, name, keep=None):
        if name not in config[key]:
            raise DataError(f"no split for objective '{name}' in {key}={config[key]}: add it to {key}")
        return Split(data_dir, config[key][name], DATA_KIND[name], meta, seed, rank, world_size, device, keep, keep_list,
                     key=f"{key}['{name}']")

    train_data = {n: make_split('train_splits', n, keep if n == keep_objective else None) for n in objectives}
    val_data = {n: make_split('val_splits', n) for n in objectives}
    if data_selection:  # the trusted split rides along in train_data so that its cursor is checkpointed too
        if selection_objective not in objectives or (lower_level == 'copy' and deepspeed and zero_stage == 3):
            raise DataError(f"data_selection: selection_objective '{selection_objective}' must be one of {objectives}, "
                            f"and under ZeRO-3 the policy cannot be copied: set lower_level='reference' (or zero_stage <= 2)")
        train_data['trusted'] = Split(data_dir, trusted_split, DATA_KIND[selection_objective], meta, seed, rank,
                                      world_size, device, key='trusted_split')
    for split in train_data.values():
        split.check_batch(batch_size)
    if (example_weights or coreset) and keep_objective not in objectives:
        raise DataError(f"example_weights/coreset index keep_objective's train split, but '{keep_objective}' is not one "
                        f"of objectives={objectives}: set keep_objective")
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

if optima and len(optima) != len(objectives):
    fail(f"optima={optima} must hold one f* per objective {objectives} (a number or a single-objective run's out_dir), "
         f"or be [] if unknown")
try:
    optimum_values = [read_optimum(n, o, comparable(n)) for n, o in zip(objectives, optima)] if optima else None
except ValueError as e:
    fail(str(e))
demo_data = os.path.abspath(data_dir) == os.path.abspath(os.path.join(os.path.dirname(__file__), 'data', 'demo'))
if not demo_data and (beta, length_normalize, learning_rate) == (5.0, True, 1e-3) and master:
    print(f"note: beta=5.0, length_normalize=True and learning_rate=1e-3 are the demo's defaults, tuned for a tiny model "
          f"from scratch; for {data_dir} set them in your config (standard DPO: beta ~0.1, summed log-probs; lr ~1e-6)")
try:  # strategy, weights and optima are checked before any model is loaded
    selector = ObjectiveSelector(objectives, weights, strategy, max_iters, optimum_values, maxright_refresh, seed)
except ValueError as e:
    fail(f"{e} (config keys objectives, strategy, weights, optima)")

# -----------------------------------------------------------------------------
# models: the policy, and the frozen reference (DPO) / teacher (KD), each loaded on its own

from transformers import AutoConfig, AutoModelForCausalLM
from model import load_model, check_vocab, drop_dropout, enable_checkpointing, frozen, add_lora

checkpoint, state = None, None  # the pointer ckpt.json, and plain torch's ckpt.pt (checkpoint.py)
if master:
    finish_publish(out_dir)
if distributed:
    dist.barrier()  # every rank reads the published files
if init_from == 'resume':  # the pointer exists: resume_config read its config
    try:
        checkpoint, state = read_checkpoint(out_dir)
    except ValueError as e:
        fail(str(e))
policy_source = checkpoint['policy_init'] if checkpoint else init_from


def built(step, *args, **kwargs):
    """One step of model.py; its ValueError (bad input) is the run's one-line error."""
    try:
        return step(*args, **kwargs)
    except ValueError as e:
        fail(str(e))


def load(source):
    return built(load_model, source, meta, seed, n_layer, n_head, n_embd, block_size)

if checkpoint and not lora_rank:  # every weight comes from the checkpoint (DeepSpeed's: the engine loads them below)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint['model_config']))
    if checkpoint['format'] == 'torch':
        model.load_state_dict({k: v for k, v in state['model'].items() if not k.startswith('value_head.')})  # rl: below
else:  # LoRA resumes its frozen base from its source, as the reference is loaded, and the adapters from the checkpoint
    model = load(policy_source)
if disable_dropout:
    drop_dropout(model)
if 'rl' in objectives and rl_advantage == 'ppo':  # PPO's value head: a submodule of the policy, so that the optimizer,
    model.value_head = rl.value_head(model)         # the checkpoint and ZeRO take it along; the HF export leaves it out
    if checkpoint and checkpoint['format'] == 'torch':
        model.value_head.load_state_dict({k[len('value_head.'):]: v for k, v in state['model'].items()
                                          if k.startswith('value_head.')})
vocab_size = built(check_vocab, model, policy_source, meta, meta_path)
positions = getattr(model.config, 'max_position_embeddings', None)
for split in list(train_data.values()) + list(val_data.values()):
    longest = split.longest + (rl_max_new_tokens if split.kind == 'prompt' else 0)  # rl: prompt + completion
    if positions and longest > positions:
        fail(f"{split.name} in {data_dir} has examples of up to {longest} tokens"
             f"{' with rl_max_new_tokens' * (split.kind == 'prompt')}, more than the model's {positions} positions "
             f"(block_size for a scratch model): prepare the data with --max_length={positions} or raise block_size")
for split in list(train_data.values()) + list(val_data.values()):
    if len(split.tokens) and int(split.tokens.max()) >= vocab_size:
        fail(f"{split.name}.bin in {data_dir} holds token id {int(split.tokens.max())} >= the model's vocab "
             f"{vocab_size}: the bins were prepared with another tokenizer; prepare them again")
model.config.use_cache = False
if gradient_checkpointing:
    built(enable_checkpointing, model, policy_source)
if lora_rank:  # the checkpoints hold the adapters alone
    model, adapters_off = built(add_lora, model, lora_rank, lora_alpha, lora_dropout, lora_targets,
                        digest=reference_logps == 'precompute')
    if checkpoint and checkpoint['format'] == 'torch':
        model.load_state_dict(state['model'], strict=False)
if not deepspeed:
    model.to(device)  # fp32 master weights; bf16 compute through autocast
# the reference computes exactly as the policy does, so that at step 0 every pair's margin is exactly 0: under
# DeepSpeed the engine holds the policy in the training dtype; plain torch keeps fp32 weights under autocast
frozen_setup = dict(vocab_size=vocab_size, device=device, dtype=ptdtype if deepspeed else torch.float32, zero3_config=None)
if deepspeed and zero_stage == 3:  # partitioned like the policy; forward only
    frozen_setup['zero3_config'] = {'train_micro_batch_size_per_gpu': batch_size, 'bf16': {'enabled': dtype == 'bfloat16'},
                                    'fp16': {'enabled': dtype == 'float16'}, 'zero_optimization': {'stage': 3}}
reference = None
if 'dpo' in objectives or (data_selection and lower_level == 'reference') or ('rl' in objectives and rl_kl > 0):
    source = reference_from or policy_source
    reference = adapters_off if lora_rank and not reference_from else \
        built(frozen, load(source), source, 'reference', digest=reference_logps == 'precompute', **frozen_setup)
teacher = None
if 'kd' in objectives:
    if not teacher_from:
        fail("objective 'kd' needs teacher_from = a local HF model directory")
    teacher = built(frozen, load(teacher_from), teacher_from, 'teacher', **frozen_setup)
ctx = SimpleNamespace(reference=reference, teacher=teacher, beta=beta, dpo_loss=dpo_loss, label_smoothing=label_smoothing,
                      length_normalize=length_normalize, dpo_nll_weight=dpo_nll_weight, fused_kernels=fused_kernels,
                      reference_cache=None,
                      grads_in_forward=sft_grads_in_forward and not data_selection)
if 'rl' in objectives:
    ctx.__dict__.update(rl_context)
# plain torch: fp32 master weights, matmuls in dtype through autocast (CPU too); DeepSpeed casts the model itself
autocast = torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=not deepspeed and dtype != 'float32')


if reference_logps == 'precompute' and reference is not None:
    pref = {s.name: s for s in [*train_data.values(), *val_data.values()] if s.kind == 'pref'}  # dpo's and the trusted split
    fingerprint = {f'data {s.name}': s.digest() for s in pref.values()}
    source = reference_from or policy_source
    fingerprint['reference'] = [os.path.abspath(source) if source != 'scratch' else f'scratch seed {seed}',
                                reference.config.to_json_string(), reference.bipost_weights]
    fingerprint['settings'] = {**{k: config[k] for k in ('dtype', 'deepspeed', 'zero_stage', 'fused_kernels')},
                               'device': device.split(':')[0]}
    ctx.reference_cache = load_or_compute(os.path.join(out_dir, 'reference_logps.npz'), list(pref.values()), fingerprint,
                                          lambda split: reference_pass(reference, split, ctx, batch_size, autocast), master)
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
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------
# optimizer: explicit DeepSpeed, or plain torch

micro_steps = gradient_accumulation_steps * (len(objectives) if strategy == 'mix' else 1)
trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
decay = [p for p in trained if p.dim() >= 2]
no_decay = [p for p in trained if p.dim() < 2]
groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
if deepspeed:
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
                      data_selector=data_selector, keep_fraction=keep_fraction, train_data=train_data, device=device)
iter_num, skipped = resume(run, checkpoint, state) if checkpoint else (0, 0)  # updates taken, micro-batches skipped
del state  # plain torch: ckpt.pt's tensors, loaded into the model and optimizer
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
if master and not eval_only and os.path.exists(metrics_path):  # as if never stopped (fresh: started over)
    restart_metrics(metrics_path, checkpoint, iter_num)
if checkpoint and master:
    print(f"resumed from {out_dir} at update {iter_num}, with the config saved there")

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


@torch.no_grad()
def estimate(name, split, batches):
    """Per-example mean loss and metrics of one objective, over all ranks (forward only). batches: this rank's
    [(example ids, weights)], as many on every rank (ZeRO-3's forwards are collective): weight 0 pads."""
    raw_model.eval()
    sums, count = {}, 0.0
    for ids, weights in batches:
        with autocast:
            losses, metrics = OBJECTIVES[name](raw_model, split.batch(ids), ctx)
        w = torch.as_tensor(weights, dtype=torch.float64, device=losses.device)
        count += float(w.sum())
        for k, v in {'loss': losses, **metrics}.items():  # an objective's metrics['loss'] is its value (DPO without NLL)
            sums[k] = sums.get(k, 0.0) + float(torch.where(w > 0, v.double() * w, 0.0).sum())
    raw_model.train()
    keys = sorted(sums)
    totals = all_sum([sums[k] for k in keys] + [count])
    return {k: total / totals[-1] for k, total in zip(keys, totals)}


def evaluate():
    """Every held-out example counted exactly once, weighted by example: the first eval_iters x batch_size x ranks
    examples of each val split (all of it if eval_iters = 0), dealt round-robin over ranks."""
    results = {}
    for name, split in val_data.items():
        for k, v in estimate(name, split, split.round_robin(eval_examples(name), batch_size)).items():
            results[f'val/{name}/{k}'] = v
    if optimum_values:  # f* known for every objective (optima): the headline number
        gaps = [results[f'val/{n}/loss'] - f for n, f in zip(objectives, optimum_values)]
        results['val/ideal_distance'] = math.sqrt(sum(g * g for g in gaps))
    return results


def log(record, line):
    if not master:
        return
    print(line, flush=True)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


def zero_loss():
    """A loss with zero gradient for every parameter: stands in for a skipped non-finite micro-batch."""
    return sum((p.view(-1)[:1] * 0).sum() for p in raw_model.parameters() if p.requires_grad)

# -----------------------------------------------------------------------------
# startup facts

n_params = sum(memory_plan.numel(p) for p in raw_model.parameters())  # ZeRO-3 leaves empty placeholders
peak = memory_plan.peak_flops(torch.cuda.get_device_name(device), peak_flops) if device.startswith('cuda') else None
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"policy: {policy_source} | {n_params / 1e6:.2f}M parameters | vocab {vocab_size} | dtype {dtype}" + (
          f" | LoRA rank {lora_rank}: {sum(memory_plan.numel(p) for p in trained) / 1e6:.3g}M trained" if lora_rank else ''))
    print(f"objectives: {objectives} | strategy {strategy} | weights {weights} | "
          f"f* {[round(v, 4) for v in optimum_values] if optimum_values else 'unknown (optima = [])'}")
    print(f"world {world_size} | {'deepspeed ZeRO-' + str(zero_stage) if deepspeed else 'plain torch'} | device {device} | "
          f"{batch_size} x {gradient_accumulation_steps} accum x {world_size} ranks = "
          f"{batch_size * gradient_accumulation_steps * world_size} examples (pairs for dpo) per update")
    for name in objectives:
        print(f"  {name}: train {train_data[name].name} ({len(train_data[name].ids)} examples), "
              f"val {val_data[name].name} ({len(val_data[name].index)})")
    longest = max(batch_size * {'pref': 2, 'prompt': rl_group}.get(DATA_KIND[n], 1) *
                  (s.longest + (rl_max_new_tokens if n == 'rl' else 0))
                  for n, s in train_data.items() if n in objectives)  # tokens of the largest micro-batch
    print(memory_plan.plan(raw_model, [m for m in (reference, teacher) if m is not None], deepspeed, zero_stage, world_size,
                           offload, torch.finfo(ptdtype).bits // 8, longest, gradient_checkpointing))
    if device.startswith('cuda') and peak is None:
        print(f"note: no peak FLOP/s known for {torch.cuda.get_device_name(device)}: set peak_flops for an MFU in the log")
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
        results = evaluate()
        log({'iter': iter_num, **results}, f"eval {iter_num} | " + " | ".join(
            f"{n} {results[f'val/{n}/loss']:.4f}" for n in objectives) +
            (f" | dpo acc {results['val/dpo/rewards/accuracies']:.2f}" if 'dpo' in objectives else '') +
            (f" | rl acc {results['val/rl/accuracy']:.3f}" if 'val/rl/accuracy' in results else '') +
            (f" | ideal {results['val/ideal_distance']:.4f}" if optimum_values else ''))
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
            selector.observe(name, estimate(name, train_data[name], [(ids, np.ones(len(ids)))])['loss'])
    chosen = selector.choose(iter_num)

    totals, tokens = {}, 0
    for name, weight in chosen:
        split = train_data[name]
        for micro_step in range(gradient_accumulation_steps):
            batch = split.batch(split.next_ids(batch_size))
            if deepspeed and zero_stage == 3:  # ZeRO-3 adds this micro-step's gradient to the partitions (not copies it
                # over them) only if told a new forward began, which engine.forward does and the objectives bypass
                getattr(engine.optimizer, 'clear_backward_seen_flag', lambda: None)()  # older DeepSpeed: absent, not needed
            if example_weight is not None and name == keep_objective:  # coreset or data selector weights, known to
                batch['weights'] = example_weight[batch['index']]          # sft, whose head then has its gradient early
            with autocast:
                losses, metrics = OBJECTIVES[name](raw_model, batch, ctx)
                loss = losses.mean() if 'weights' not in batch else (batch['weights'] * losses).mean()
                if data_selector and name == selection_objective:  # weighted + trusted loss; also steps ω and θ̂
                    trusted = train_data['trusted'].batch(train_data['trusted'].next_ids(batch_size))
                    loss = data_selector.step(losses, batch, trusted, raw_model, ctx, split.epoch)
            finite = all_mean([float(torch.isfinite(loss))])[0] == 1.0  # every rank takes the same branch
            if not finite:
                if nonfinite == 'stop':
                    fail(f"non-finite {name} loss at update {iter_num} (lr {lr:.2e}): stopped before any "
                         f"checkpoint was written; lower learning_rate, check the data, or set nonfinite='skip'")
                skipped += 1
                loss = zero_loss()
            scale = weight * len(chosen)  # mix: the engine divides by micro_steps, which counts every objective
            if deepspeed:
                engine.backward(loss * scale)  # the engine scales by 1/gradient_accumulation_steps itself
                engine.step()                  # every micro-step: the engine updates at the boundary
            else:
                (loss * scale / micro_steps).backward()
            tokens += int(batch['attention_mask'].sum()) if split.kind != 'prompt' else \
                round(rl_group * float(batch['attention_mask'].sum() + metrics['length'].sum()))  # G x (prompt + answer)
            for k, v in {'loss': losses.detach(), **metrics}.items():
                totals[f'{name}/{k}'] = totals.get(f'{name}/{k}', 0.0) + v.float().mean().item() / gradient_accumulation_steps
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
    *values, tokens = all_sum([totals[k] for k in keys] + [tokens])
    totals = {k: v / world_size for k, v in zip(keys, values)}
    if strategy == 'maxright':  # the step just taken refreshes the chosen objective's estimate
        selector.observe(chosen[0][0], totals[f'{chosen[0][0]}/loss'])

    t1 = time.time()
    dt, t0 = t1 - t0, t1
    iter_num += 1
    if iter_num % log_interval == 0:
        names = '+'.join(n for n, _ in chosen)
        line = f"iter {iter_num} | {names} | " + " | ".join(
            f"{k.split('/', 1)[0]} loss {v:.4f}" for k, v in totals.items() if k.endswith('/loss'))
        if 'dpo/rewards/accuracies' in totals:
            line += f" | acc {totals['dpo/rewards/accuracies']:.2f} | margin {totals['dpo/rewards/margins']:.3f}"
        if 'rl/reward' in totals:
            line += (f" | reward {totals['rl/reward']:.2f} | kl {totals.get('rl/kl', 0):.4f} | "
                     f"{totals['rl/gen_tokens_per_s'] / 1000:.1f}k gen tok/s")
        line += f" | lr {lr:.2e} | {dt * 1000:.0f}ms | {tokens / dt / 1000:.1f}k tok/s"
        speed = {}
        if peak:  # 6P per trained token, +2P per token through a frozen reference/teacher; rank 0's peak memory
            flops = tokens * (6 + 2 * any(n in ('dpo', 'kd') or n == 'rl' and rl_kl > 0 for n, _ in chosen)) * n_params
            speed = {'mfu': flops / dt / (peak * world_size), 'peak_gib': torch.cuda.max_memory_allocated() / 2**30}
            line += f" | mfu {100 * speed['mfu']:.0f}% | {speed['peak_gib']:.1f} GiB"
        log({'iter': iter_num, 'objective': names, 'lr': lr, 'ms': dt * 1000, 'tokens': tokens, 'skipped': skipped,
             **speed, **{f'train/{k}': v for k, v in totals.items()}}, line)

if distributed:
    dist.barrier()
    dist.destroy_process_group()
