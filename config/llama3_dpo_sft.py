# Joint DPO + SFT on Meta-Llama-3-8B, 8 GPUs, DeepSpeed ZeRO-3, bf16, alright with λ = 0.5.
#   python data/prepare.py --out_dir=data/llama3_mix --tokenizer=/models/Meta-Llama-3-8B --max_length=1024 \
#       sft_train=sft.jsonl sft_val=sft_val.jsonl pref_train=prefs.jsonl pref_val=prefs_val.jsonl
#   torchrun --nproc_per_node=8 bipost.py config/llama3_dpo_sft.py
# Batch arithmetic: 2 examples (pairs for dpo) × 8 accum × 8 GPUs = 128 per update.
# Each update is all-SFT or all-DPO (alright draws one per update, the same on every rank), so an
# update costs what one update of the sequential recipe costs.
out_dir = 'out-llama3-dpo-sft'
init_from = '/models/Meta-Llama-3-8B'   # a local HF directory (config.json + safetensors + tokenizer)
reference_from = ''                      # the reference is init_from, loaded separately and frozen
reference_logps = 'precompute'          # the reference runs once over the pairs, then is freed (Tulu 3): no 2nd model, no ref forward per step
dataset = 'llama3_mix'
objectives = ['sft', 'dpo']
strategy = 'alright'
weights = [0.5, 0.5]
optima = []                              # f* unknown until single-objective runs measured it: e.g. ["out-sft", "out-dpo"]
beta = 0.1
length_normalize = False                 # standard DPO: summed log-probs
batch_size = 2
gradient_accumulation_steps = 8
learning_rate = 1e-6
min_lr = 1e-7
warmup_iters = 20
max_iters = 1000
eval_interval = 100
eval_iters = 20
deepspeed = True
zero_stage = 3
dtype = 'bfloat16'
gradient_checkpointing = True            # activations of 2 pairs x 1024 tokens through 32 layers: ~25 GB per GPU without, ~2 GB with
