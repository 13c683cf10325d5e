"""
What a run prints (rank 0): the startup facts before the first update (STYLE: parameters, the batch arithmetic,
the splits, the memory plan), then one grep-able line per eval and per logged update. The numbers behind each line
go to metrics.jsonl beside it (bipost.py's log); docs/metrics.md says what every field means.
"""
import torch

import memory_plan


def startup_facts(c, raw_model, trained, frozen_models, train_data, val_data, kinds, policy_source, vocab_size,
                  world_size, device, accumulation, optimum_values, n_params, peak, side_models=()):
    """Print the facts of the run about to start; c: the config."""
    print(f"policy: {policy_source} | {n_params / 1e6:.2f}M parameters | vocab {vocab_size} | dtype {c['dtype']}" + (
          f" | LoRA rank {c['lora_rank']}: {sum(memory_plan.numel(p) for p in trained) / 1e6:.3g}M trained"
          if c['lora_rank'] else ''))
    print(f"objectives: {c['objectives']} | strategy {c['strategy']} | weights {c['weights']} | "
          f"f* {[round(v, 4) for v in optimum_values] if optimum_values else 'unknown (optima = [])'}")
    engine = f"deepspeed ZeRO-{c['zero_stage']}" if c['deepspeed'] else 'plain torch'
    rows = f"{'packed' if c['packing'] else 'padded'} rows"
    if c['max_tokens_per_batch']:  # RL's prompts keep batch_size
        print(f"world {world_size} | {engine} | device {device} | micro-batches of up to {c['max_tokens_per_batch']} "
              f"tokens x {accumulation} accum x {world_size} ranks per update | {rows}")
    else:
        n = c['batch_size'] * accumulation * world_size
        what = ', '.join([f"pairs for {k}" for k in c['objectives'] if kinds.get(k) == 'pref'] +
                         [f"prompts x {c['rl_group']} completions for rl"] * ('rl' in c['objectives']))
        print(f"world {world_size} | {engine} | device {device} | {c['batch_size']} x {accumulation} accum x "
              f"{world_size} ranks = {n} examples{f' ({what})' if what else ''} per update | {rows}")
    for name in c['objectives']:
        print(f"  {name}: train {train_data[name].name} ({len(train_data[name].ids)} examples), "
              f"val {val_data[name].name} ({len(val_data[name].index)})")
    rows = {'pref': 2, 'unpaired': 2, 'prompt': c['rl_group']}  # sequences per example of each kind of split
    longest = max(s.max_tokens or  # tokens of the largest micro-batch (by tokens: its real ones, without the padding)
                  c['batch_size'] * rows.get(kinds[n], 1) * (s.longest + (c['rl_max_new_tokens'] if n == 'rl' else 0))
                  for n, s in train_data.items() if n in c['objectives'])
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[c['dtype']]
    print(memory_plan.plan(raw_model, frozen_models, c['deepspeed'], c['zero_stage'], world_size, c['offload'],
                           torch.finfo(dtype).bits // 8, longest, c['gradient_checkpointing'], device.startswith('cuda'),
                           side_models))
    if device.startswith('cuda') and peak is None:
        print(f"note: no peak FLOP/s known for {torch.cuda.get_device_name(device)}: set peak_flops for an MFU in the log")


def eval_line(iter_num, results, objectives, optimum_values):
    return (f"eval {iter_num} | " + " | ".join(f"{n} {results[f'val/{n}/loss']:.4f}" for n in objectives) +
            (f" | dpo acc {results['val/dpo/rewards/accuracies']:.2f}" if 'dpo' in objectives else '') +
            (f" | rl acc {results['val/rl/accuracy']:.3f}" if 'val/rl/accuracy' in results else '') +
            (f" | rm acc {results['val/rm/accuracy']:.2f}" if 'rm' in objectives else '') +
            (f" | ideal {results['val/ideal_distance']:.4f}" if optimum_values else ''))


def update_line(iter_num, names, totals, lr, seconds, tokens, n_params, peak, world_size, through_frozen):
    """The log line of one update, and its speed record (MFU and rank 0's peak GiB, on a GPU with a known peak).
    through_frozen: the update's tokens also went through a frozen reference or teacher."""
    line = f"iter {iter_num} | {names} | " + " | ".join(
        f"{k.split('/', 1)[0]} loss {v:.4f}" for k, v in totals.items() if k.endswith('/loss'))
    if 'dpo/rewards/accuracies' in totals:
        line += f" | acc {totals['dpo/rewards/accuracies']:.2f} | margin {totals['dpo/rewards/margins']:.3f}"
    if 'rl/reward' in totals:
        line += (f" | reward {totals['rl/reward']:.2f} | kl {totals.get('rl/kl', 0):.4f} | "
                 f"{memory_plan.per_second(totals['rl/gen_tokens_per_s'])} gen tok/s")
    line += f" | lr {lr:.2e} | {seconds * 1000:.0f}ms | {memory_plan.per_second(tokens / seconds)} tok/s"
    speed = {}
    if peak:  # 6P per trained token, +2P per token through a frozen reference/teacher
        flops = tokens * (6 + 2 * through_frozen) * n_params
        speed = {'mfu': flops / seconds / (peak * world_size), 'peak_gib': torch.cuda.max_memory_allocated() / 2**30}
        line += f" | mfu {100 * speed['mfu']:.0f}% | {speed['peak_gib']:.1f} GiB"
    return line, speed
