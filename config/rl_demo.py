# RL with verifiable rewards (Tulu 3's RLVR, GRPO's group-relative advantages) on the CPU demo: two-digit addition,
# reward 10 for the right sum (rewards.verify_number), else 0, from the SFT warm-up's checkpoint.
#   python bipost.py config/rl_sft_warmup.py    # first: ~1 min, writes out-rl-sft/hf
#   python bipost.py config/rl_demo.py          # ~2 min on one CPU core: held-out greedy accuracy 0.585 -> 0.74 (seed 1337)
#   python bipost.py config/rl_demo.py --objectives="['sft', 'rl']" --weights="[0.5, 0.5]" --out_dir=out-rl-joint  # joint
#   python data/demo/rl_table.py                # the table of docs/rl.md: these runs and more, over seeds
# 32 prompts × 8 completions × 1 accum × 1 rank = 256 completions per RL update, 300 updates; each completion at most
# 4 tokens (a sum has 1-2 digits, then EOS). Held-out: greedy decoding of rl_val's 200 problems, none of them in a
# training split; val/rl/loss = −mean reward.
out_dir = 'out-rl'
dataset = 'demo'
init_from = 'out-rl-sft/hf'
objectives = ['rl']
weights = [1.0]
train_splits = {'sft': 'sft_add_train', 'rl': 'rl_train'}  # the sft entries for the joint and sequential runs
val_splits = {'sft': 'sft_add_val', 'rl': 'rl_val'}
batch_size = 32
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
max_iters = 300
eval_interval = 50
rl_group = 8
rl_max_new_tokens = 4
rl_temperature = 0.7
rl_reward = 'verify_number'
rl_reward_scale = 10.0
rl_advantage = 'group_std'
rl_kl = 0.01
rl_loss_norm = 'bnpo'
