# BRIEF coreset selection on the demo (docs/coresets.md): a weighted 5% of sft_train whose per-example
# gradients cover those of the whole split, in the knowledge (response alone) and instruction-following spaces.
#   python bipost.py config/brief_demo.py --coreset=random --out_dir=out-brief-warmup-keep            # a random 5%
#   python bipost.py config/brief_demo.py --coreset="''" --keep_list=out-brief-warmup-keep/keep.npy \
#     --out_dir=out-brief-warmup                                                    # warm-up: 4 epochs of that 5%
#   python bipost.py config/brief_demo.py --coreset_adam=out-brief-warmup   # features at the warm-up's weights,
#                          # preconditioned by its Adam state, and BRIEF -> out-brief/{weights,keep,ranking}.npy
#   python bipost.py config/brief_demo.py --coreset="''" --keep_list=out-brief/keep.npy \
#     --example_weights=out-brief/weights.npy --out_dir=out-brief-train             # train on the weighted coreset
#   python data/demo/brief_table.py       # the table of docs/coresets.md: BRIEF vs CRAIG vs random vs all data, 3 seeds
# Feature pass: per-example gradients of the last layer + final norm + head (~82k parameters), Adam-preconditioned
# by the warm-up's optimizer state, projected to 512 dimensions; 16 examples per vmap'd batch.
# Training: 16 examples × 1 accum × 1 rank per update; 25 updates = 4 epochs of a 100-example coreset.
out_dir = 'out-brief'
dataset = 'demo'
objectives = ['sft']
weights = [1.0]
optima = []
strategy = 'sequential'
train_splits = {'sft': 'sft_train'}
val_splits = {'sft': 'sft_val'}
keep_objective = 'sft'
coreset = 'brief'
coreset_fraction = 0.05
coreset_dim = 512
coreset_params = 'last'
n_layer = 2
n_head = 4
n_embd = 64
batch_size = 16
learning_rate = 1e-3
max_iters = 25
warmup_iters = 5
eval_interval = 25
eval_iters = 0                # the whole of sft_val
