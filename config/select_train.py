# Train on the examples the data selector kept (run config/select_demo.py first; it writes out-select/keep.npy).
#   python bipost.py config/select_train.py                               # ~30 s on 2 CPU cores
#   python bipost.py config/select_train.py --keep_list=''                # the same budget on all (noisy) examples
# SFT only, 16 examples × 1 accum × 1 rank = 16 per update, 300 updates (~3 epochs of the 1600 kept examples).
out_dir = 'out-select-train'
dataset = 'demo'
objectives = ['sft']
weights = [1.0]
optima = []
strategy = 'sequential'
train_splits = {'sft': 'sft_noisy_train'}
val_splits = {'sft': 'sft_val'}
keep_list = 'out-select/keep.npy'
keep_objective = 'sft'
n_layer = 2
n_head = 4
n_embd = 64
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 300
warmup_iters = 10
eval_interval = 100
eval_iters = 19               # 19 × 16 ≥ 300: the whole of sft_val
export_hf = False
