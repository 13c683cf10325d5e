"""
The settings checked at startup, before any data or model is loaded and before anything is written: a value
outside its choices, or a combination that cannot work, is refused with one line that says how to fix it
(bipost.py prints it as `bipost: error: ...`, exit code 1). Checks that need the data or a model are made where
those are read (data/loader.py, model.py).
"""
import math
import os

from objectives import OBJECTIVES, DATA_KIND, NEEDS_REFERENCE
from bipost_kernels.dpo import check_settings as check_dpo_loss

CHOICES = {'dtype': ('float32', 'bfloat16', 'float16'), 'nonfinite': ('stop', 'skip'),
           'reference_logps': ('live', 'precompute'), 'coreset': ('', 'brief', 'craig', 'random'),
           'coreset_params': ('last', 'trainable')}


def check_settings(c, world_size):
    """Raise ValueError at the first bad setting of config c. Returns the gradient accumulation steps: total_batch_size,
    if set, fixes the examples per update for any world size, and the accumulation absorbs the world size."""
    for key, allowed in CHOICES.items():
        if c[key] not in allowed:
            raise ValueError(f"{key}={c[key]!r} is not one of {allowed}")
    for name in c['objectives']:
        if name not in OBJECTIVES:
            raise ValueError(f"objectives: unknown objective '{name}'; known: {sorted(OBJECTIVES)} (add one in objectives.py)")
    batch_size, accumulation = c['batch_size'], c['gradient_accumulation_steps']
    if c['total_batch_size']:
        if c['total_batch_size'] % (batch_size * world_size):
            raise ValueError(f"total_batch_size={c['total_batch_size']} is not divisible by batch_size {batch_size} x "
                             f"{world_size} ranks: use a multiple of {batch_size * world_size}, or another batch_size")
        accumulation = c['total_batch_size'] // (batch_size * world_size)
    if batch_size < 1 or accumulation < 1:
        raise ValueError(f"batch_size={batch_size} and gradient_accumulation_steps={accumulation} must be >= 1")
    if c['max_tokens_per_batch'] < 0:
        raise ValueError(f"max_tokens_per_batch={c['max_tokens_per_batch']} must be >= 0 (0: micro-batches of batch_size "
                         f"examples; > 0: filled up to that many tokens)")
    if c['max_tokens_per_batch'] and (c['total_batch_size'] or c['data_selection']):
        raise ValueError(f"max_tokens_per_batch={c['max_tokens_per_batch']} fills micro-batches by tokens, but "
                         f"{'total_batch_size (a count of examples)' if c['total_batch_size'] else 'data_selection (its passes take batch_size examples)'}"
                         f" needs it 0: set one of them")
    lr, min_lr = c['learning_rate'], c['min_lr']
    if not (math.isfinite(lr) and 0 < lr <= 1 and 0 <= min_lr <= lr):
        raise ValueError(f"learning_rate={lr} and min_lr={min_lr}: need 0 < learning_rate <= 1 and 0 <= min_lr <= "
                         f"learning_rate (~1e-6-1e-5 for billion-parameter models, ~1e-3 for the demo)")
    objectives = c['objectives']
    check_dpo_loss(c['dpo_loss'] if 'dpo' in objectives else 'sigmoid', c['dpo_loss_weights'], c['label_smoothing'])
    weighted = (c['selection_objective'],) * c['data_selection'] + (c['keep_objective'],) * bool(c['example_weights'])
    if 'aot' in c['dpo_loss'] and 'dpo' in weighted:
        raise ValueError(f"dpo_loss={c['dpo_loss']!r}: 'aot' and 'aot_unpaired' sort the pairs of a micro-batch, so "
                         f"per-pair weights (data_selection, example_weights) would land on other pairs; use another "
                         f"loss type for weighted pairs")
    if c['simpo_gamma'] < 0:
        raise ValueError(f"simpo_gamma={c['simpo_gamma']} must be >= 0: SimPO's target margin between chosen and "
                         f"rejected (~0.5-1.6)")
    if c['ld_alpha'] != 1.0 and ('dpo' not in objectives or c['reference_logps'] == 'precompute'
                                 or not 0 <= c['ld_alpha'] <= 1):
        raise ValueError(f"ld_alpha={c['ld_alpha']} (LD-DPO) weighs the dpo objective's per-token log-ratios: it needs "
                         f"'dpo' in objectives, reference_logps='live' and 0 <= ld_alpha <= 1; or set ld_alpha=1")
    if 'kto' in objectives and (batch_size < 2 or c['reference_logps'] == 'precompute'):
        raise ValueError(f"objective 'kto' needs batch_size >= 2 (got {batch_size}: its KL pairs are other examples' "
                         f"completions) and reference_logps='live' (got {c['reference_logps']!r}: the pairs change "
                         f"with every batch)")
    reference_needed = any(n in NEEDS_REFERENCE for n in objectives) or (
        c['data_selection'] and c['lower_level'] == 'reference') or ('rl' in objectives and c['rl_kl'] > 0)
    if c['reference_from'] and not reference_needed:
        raise ValueError(f"reference_from={c['reference_from']!r} is unused: objectives {objectives} need no reference "
                         f"model (only dpo, kto, rl with rl_kl > 0 and the data selector's lower_level='reference' "
                         f"read one); remove reference_from")
    selecting_pairs = DATA_KIND.get(c['selection_objective']) == 'pref'
    if c['data_selection'] and c['lower_level'] == 'reference' and selecting_pairs:
        raise ValueError("data_selection: lower_level='reference' with preference pairs scores every pair against the "
                         "reference itself (log 2 each), which is exactly lower_level='none': use 'copy' or 'none'")
    if c['coreset'] and not (0 < c['coreset_fraction'] <= 1 and c['coreset_dim'] >= 1 and not c['deepspeed']
                             and DATA_KIND.get(c['keep_objective']) == 'sft' and not c['keep_list']):
        raise ValueError(f"coreset={c['coreset']!r} needs 0 < coreset_fraction <= 1 (got {c['coreset_fraction']}), "
                         f"coreset_dim >= 1, an SFT keep_objective (got {c['keep_objective']!r}), deepspeed=False (one "
                         f"plain-torch pass) and keep_list=''")
    if c['example_weights'] and c['data_selection']:
        raise ValueError("example_weights and data_selection both weight the training examples: set one of them")
    if c['data_selection'] and c['lower_level'] == 'reference' and c['reference_logps'] == 'precompute':
        raise ValueError("reference_logps='precompute' frees the reference, but data_selection's lower_level='reference' "
                         "runs it as θ̂ during training: set lower_level='copy' or 'none', or reference_logps='live'")
    heads = {'rm': "rm's reward head", 'rl': "PPO's value head" if c['rl_advantage'] == 'ppo' else ''}
    head = next((heads[n] for n in objectives if heads.get(n)), '')  # a weight that one objective alone reaches
    if c['deepspeed'] and c['offload'] and head and len(objectives) > 1:
        raise ValueError(f"offload=True with objectives {objectives}: DeepSpeed's offloaded optimizer receives a "
                         f"weight's gradient only at an update's last micro-step, if that reaches the weight (else it "
                         f"keeps a stale one), and {head} is not reached by every micro-step: set offload=False, or "
                         f"train that objective alone")
    if 'kd' in c['objectives'] and not c['teacher_from']:
        raise ValueError("objective 'kd' needs teacher_from = a local HF model directory")
    if c['optima'] and len(c['optima']) != len(c['objectives']):
        raise ValueError(f"optima={c['optima']} must hold one f* per objective {c['objectives']} (a number or a "
                         f"single-objective run's out_dir), or be [] if unknown")
    return accumulation


def demo_defaults_note(c, data_dir):
    """A note (not an error) when a run on other data keeps the demo's DPO and lr settings, which are tuned for a tiny
    model trained from scratch; '' otherwise."""
    demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'demo')
    if os.path.abspath(data_dir) == demo or (c['beta'], c['length_normalize'], c['learning_rate']) != (5.0, True, 1e-3):
        return ''
    return (f"note: beta=5.0, length_normalize=True and learning_rate=1e-3 are the demo's defaults, tuned for a tiny "
            f"model from scratch; for {data_dir} set them in your config (a pretrained model: lr ~1e-6 to 1e-5; DPO "
            f"and kto: beta ~0.1 on summed log-probs)")
