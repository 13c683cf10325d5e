# The RL demo's first step: a brief SFT warm-up on two-digit addition ("23+45=" -> "68"), so that RL starts from a
# model that is sometimes right (verifiable rewards need some successes to learn from). Only 500 demonstrations
# (sft_add_train); RL then has 2300 prompts with verifiable answers (rl_train), as in practice.
#   python bipost.py config/rl_sft_warmup.py    # ~1 min on one CPU core; held-out greedy accuracy 0.585 (seed 1337)
#   python bipost.py config/rl_demo.py          # then RL from out-rl-sft/hf (config/rl_demo.py)
# A tiny Llama (2 layers, 128 wide, vocab 257 bytes) from scratch; 32 problems × 1 accum × 1 rank = 32 per update,
# 1500 updates (~100 epochs: the held-out SFT loss bottoms out near update 1000, then the 500 demonstrations are
# overfit, and more SFT barely moves the accuracy: docs/rl.md). data/demo/prepare.py writes the task:
# sft_add_* (SFT records) and rl_* (prompts with "answer").
out_dir = 'out-rl-sft'
dataset = 'demo'
objectives = ['sft']
weights = [1.0]
train_splits = {'sft': 'sft_add_train'}
val_splits = {'sft': 'sft_add_val'}
n_layer = 2
n_head = 4
n_embd = 128
batch_size = 32
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 1500
eval_interval = 250
