# The built-in CPU demo, spelled out (these are also bipost.py's defaults): joint SFT + DPO with alright.
#   python bipost.py config/demo.py        # ~3 min on 2 CPU cores
# A tiny Llama (2 layers, 128 wide, vocab 257 bytes) from scratch on data/demo; the reference is the
# initial policy. 16 examples (pairs for dpo) × 1 accum × 1 rank = 16 per update, 300 updates.
out_dir = 'out-demo'
dataset = 'demo'
objectives = ['sft', 'dpo']
strategy = 'alright'
weights = [0.5, 0.5]
n_layer = 2
n_head = 4
n_embd = 128
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 300
eval_interval = 50
beta = 0.1
