# The built-in CPU demo, spelled out (bipost.py's defaults, plus the f* measured on it): joint SFT + DPO with alright.
#   python bipost.py config/demo.py        # ~30 s on 2 quiet CPU cores (README, quick start)
# A tiny Llama (2 layers, 128 wide, vocab 257 bytes) from scratch on data/demo; the reference is the
# initial policy. 16 examples (pairs for dpo) × 1 accum × 1 rank = 16 per update, 300 updates.
# DPO is length-normalized (Tulu 3: mean log-probs, beta ~ 5): the reference is the random initial model,
# which gives ~5.5 nats to every token, so summed log-ratios would be dominated by response length (the
# terse answer has 4 tokens, the verbose one 19): with sums, winning a style pair means making the SFT
# answer less likely than a random model does, an artificially extreme conflict (docs/results.md).
# optima: f* of each objective, the best held-out loss (all 300 val examples) of an SFT-only and a DPO-only run,
# mean over 3 seeds (data/demo/tradeoff.py, README results); a run of your own records its f* in optimum.json.
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
beta = 5.0
length_normalize = True
optima = [0.488, 0.234]
