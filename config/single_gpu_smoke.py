# Smoke test on one GPU: a small local HF model, joint SFT + DPO (standard summed DPO, β = 0.1), no
# DeepSpeed, 50 updates, a few minutes for a 1B model.
#   python bipost.py config/single_gpu_smoke.py --init_from=/models/Llama-3.2-1B --dataset=mydata
# Batch arithmetic: 4 examples (pairs for dpo) × 2 accum × 1 GPU = 8 per update.
# Prepare the data with the model's own tokenizer first (data/prepare.py --tokenizer=/models/Llama-3.2-1B): the
# run refuses data from another tokenizer. dataset has no default here, so a forgotten --dataset is an error, not a
# silent run on the demo's byte-level data.
# On a laptop CPU: keep init_from='scratch', and add --dataset=demo --learning_rate=1e-3.
out_dir = 'out-smoke'
init_from = 'scratch'
dataset = ''
objectives = ['sft', 'dpo']
strategy = 'alright'
beta = 0.1
length_normalize = False
batch_size = 4
gradient_accumulation_steps = 2
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 5
max_iters = 50
eval_interval = 25
eval_iters = 4
