# Bilevel data selection on the demo: learn one weight per example of sft_noisy_train (25% corrupted)
# against the 150 clean examples of sft_trusted, then keep the top 80%.
#   python bipost.py config/select_demo.py      # ~3 min on 2 CPU cores; writes out-select/{weights,ranking,keep}.npy
#   python bipost.py config/select_train.py     # then train on the kept examples only
# 16 training + 16 trusted examples × 1 accum × 1 rank per update; 250 updates ≈ 2 epochs of the 2000 examples
# (c = 0.5 in epoch 0, 0.25 in epoch 1). Variants: --lower_level='reference' (θ̂ = the frozen initial model, no
# second copy to train) or 'none' (no θ̂ term, as in the original BiPOST code); --selector_weights='sigmoid'.
out_dir = 'out-select'
dataset = 'demo'
objectives = ['sft']
weights = [1.0]
optima = [0.0]
strategy = 'sequential'
train_splits = {'sft': 'sft_noisy_train'}
val_splits = {'sft': 'sft_val'}
data_selection = True
selection_objective = 'sft'
trusted_split = 'sft_trusted'
selector_weights = 'softmax'
selector_lr = 0.05
lower_level = 'copy'
lower_lr = 0.1
trusted_weight = 0.5
trusted_decay = 0.5
keep_fraction = 0.8
n_layer = 2
n_head = 4
n_embd = 64
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 250
warmup_iters = 10
eval_interval = 125
eval_iters = 4
export_hf = False
