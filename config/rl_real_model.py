# RL with verifiable rewards (GRPO's group-relative advantages, Tulu 3's reward) on a real instruct model:
# SmolLM2-135M-Instruct answers the demo's additions asked in its chat template ("What is 4+23? Answer with the
# number."); reward 10 when the completion's last number is the sum (rewards.verify_number), else 0. LoRA rank 16:
# the adapters train, and the KL's reference is the same model with them off (no second copy in memory).
# docs/real-models.md makes the model directory and the data, then:
#   python bipost.py config/rl_real_model.py
# Batch arithmetic: 2 prompts × 4 completions (rl_group) × 2 accum × 1 process = 16 completions per update, each at
# most 32 new tokens after a ~44-token prompt. On a GPU raise batch_size (16-64 prompts) and rl_max_new_tokens.
# Measured with OMP_NUM_THREADS=1 on a busy shared 2-core machine: 18-21 s of CPU time per update (what one
# quiet core takes; sampling is ~2/3 of it), 39-46 s of wall time there (docs/real-models.md).
import os
out_dir = 'out-rl-real'
init_from = os.path.expanduser('~/models/SmolLM2-135M-Instruct')
dataset = 'smollm2'            # data/smollm2 (docs/real-models.md): its rl_train / rl_val prompt splits
device = 'cpu'
dtype = 'float32'
objectives = ['rl']
weights = [1.0]
lora_rank = 16
lora_alpha = 32
batch_size = 2
gradient_accumulation_steps = 2
learning_rate = 5e-5           # LoRA adapters: ~1e-5-1e-4
min_lr = 5e-6
warmup_iters = 5
max_iters = 60
eval_interval = 20
eval_iters = 8                 # 8 × 2 = 16 held-out prompts, greedy; 4 of them in out_dir/rl_samples.jsonl
rl_group = 4
rl_max_new_tokens = 32
rl_temperature = 0.7
rl_reward = 'verify_number'
rl_reward_scale = 10.0
rl_advantage = 'group_std'
rl_kl = 0.01
rl_loss_norm = 'bnpo'
