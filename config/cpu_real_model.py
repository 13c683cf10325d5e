# SFT + DPO in one run on a CPU with a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, ChatML
# template, tied embeddings), full fine-tuning in fp32. docs/real-models.md makes its HF directory and the data (the
# demo's tasks as chat messages, tokenized with the model's own tokenizer), then:
#   python bipost.py config/cpu_real_model.py
# Batch arithmetic: 4 examples (pairs for dpo) × 2 accum × 1 process = 8 SFT examples and 8 DPO pairs per update
# ('mix': both objectives every update); ~46 tokens an SFT example and ~90 a pair (chosen + rejected rows, each with
# the prompt) give ~1.1k tokens through the policy and ~0.7k through the frozen reference per update.
# Measured with OMP_NUM_THREADS=1 on a busy shared 2-core machine: 11-12 s of CPU time per update (what one
# quiet core takes), 26-36 s of wall time there; 40 updates ~8 min on a quiet core (docs/real-models.md).
# Memory: ~2.2 GB of fp32 weights, gradients and AdamW moments + 0.5 GB for the reference; --lora_rank=16 trains
# adapters alone (the reference is then the model with them off: no second copy) for ~1.1 GB in all.
import os
out_dir = 'out-cpu-real'
init_from = os.path.expanduser('~/models/SmolLM2-135M-Instruct')
dataset = 'smollm2'            # data/smollm2, prepared with the model's tokenizer (docs/real-models.md)
device = 'cpu'
dtype = 'float32'              # bfloat16 matmuls are fast only on CPUs with bf16 instructions
objectives = ['sft', 'dpo']
strategy = 'mix'
weights = [0.5, 0.5]
beta = 0.1                     # standard DPO on summed log-probs, not the demo's length-normalized β = 5
length_normalize = False
batch_size = 4
gradient_accumulation_steps = 2
learning_rate = 1e-5           # a pretrained model: ~1e-5 full fine-tuning (the demo's 1e-3 trains from scratch)
min_lr = 1e-6
warmup_iters = 5
max_iters = 40
eval_interval = 20
eval_iters = 4                 # 4 × 4 = 16 held-out examples (pairs) per objective per eval
