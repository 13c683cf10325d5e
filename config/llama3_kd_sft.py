# Joint KD + SFT: distil a frozen Llama-3-70B-Instruct teacher into Llama-3-8B while keeping SFT, 8 GPUs.
#   torchrun --nproc_per_node=8 bipost.py config/llama3_kd_sft.py
# Both objectives read SFT-shaped data (kd scores the teacher's full next-token distribution on the
# same prompt/response pairs). The teacher must share the student's tokenizer (Llama-3 family).
# Batch arithmetic: 2 sequences × 8 accum × 8 GPUs = 128 sequences per update.
# Memory: the 70B teacher is partitioned by ZeRO-3 like the policy (forward only, bf16).
out_dir = 'out-llama3-kd-sft'
init_from = '/models/Meta-Llama-3-8B'
teacher_from = '/models/Meta-Llama-3-70B-Instruct'
dataset = 'llama3_mix'
objectives = ['kd', 'sft']
strategy = 'alright'
weights = [0.5, 0.5]
optima = []                   # f* unknown: no ideal distance (maxright needs it: a single-objective run's out_dir per objective)
batch_size = 2
gradient_accumulation_steps = 8
learning_rate = 1e-6
min_lr = 1e-7
max_iters = 1000
eval_interval = 100
deepspeed = True
zero_stage = 3
dtype = 'bfloat16'
gradient_checkpointing = True # the student's activations at 2 x 1024 tokens through 32 layers: ~12 GB per GPU without, ~1 GB with
