# Bilevel data selection on the demo: learn one weight per example of sft_noisy_train (25% corrupted)
# against the 150 clean examples of sft_trusted, then keep the top 80% by weight.
#   python bipost.py config/select_demo.py      # ~1 min on 2 CPU cores; writes out-select/{weights,ranking,keep}.npy
#   python bipost.py config/select_train.py     # then train on the kept examples only
#   python data/demo/selection_eval.py          # the numbers of docs/data-selection.md: ranking AUC, kept vs all vs random (~11 min)
# 16 training + 16 trusted examples × 1 accum × 1 rank per update; 250 updates = 2 epochs of the 2000 examples.
# Variants: --lower_level='reference' (θ̂ = the frozen initial model: nothing extra to train) or 'none' (no θ̂
# term, as in the original BiPOST code); --selector_weights='sigmoid'. Preference pairs (one weight per pair):
#   python bipost.py config/select_demo.py --objectives="['dpo']" --selection_objective="'dpo'" \
#     --trusted_split="'pref_trusted'" --train_splits="{'dpo': 'pref_noisy_train'}" --val_splits="{'dpo': 'pref_val'}" \
#     --beta=0.1 --length_normalize=False   # summed DPO, as measured in docs/data-selection.md (AUC 0.71)
out_dir = 'out-select'
dataset = 'demo'
objectives = ['sft']
weights = [1.0]
optima = []
strategy = 'sequential'
train_splits = {'sft': 'sft_noisy_train'}
val_splits = {'sft': 'sft_val'}
data_selection = True
selection_objective = 'sft'
trusted_split = 'sft_trusted'
selector_weights = 'softmax'
selector_lr = 16.0            # SGD on ω; ~ the batch of 16
lower_level = 'copy'
lower_lr = 1e-3               # θ̂ keeps pace with the policy's lr
trusted_weight = 0.8          # c: 0.8 of the model's loss is the trusted batch ...
trusted_decay = 1.0           # ... in both epochs (0.5 decay measured slightly worse here: AUC 0.82 vs 0.83)
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
