# Smoke test on one GPU (or CPU): a small local HF model, joint SFT + DPO, no DeepSpeed, 50 updates.
#   python bipost.py config/single_gpu_smoke.py --init_from=/models/Llama-3.2-1B
# Batch arithmetic: 4 examples (pairs for dpo) × 2 accum × 1 GPU = 8 per update.
# With init_from='scratch' it runs the demo-sized model on data/demo instead (handy on a laptop).
out_dir = 'out-smoke'
init_from = 'scratch'
dataset = 'demo'
objectives = ['sft', 'dpo']
strategy = 'alright'
batch_size = 4
gradient_accumulation_steps = 2
learning_rate = 1e-3
max_iters = 50
eval_interval = 25
eval_iters = 4
