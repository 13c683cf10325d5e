"""
Reinforcement learning as one objective among the others (DESIGN.md, RL objective): objectives.rl is
objective() here. A module of its own because rollouts, rewards, advantages (group-relative, or PPO's GAE over
a value head), the clipped surrogate, the KL, inner epochs and their metrics are longer than objectives.py's
other objectives together; the math is in small pure functions that the tests check by hand.

One RL micro-step, on a batch of prompts from a 'prompt' split:
  1. rollout(): rl_group (G) completions per prompt from the current policy through the model's own generate
     (KV cache; ZeRO-3: synced_gpus), each rank with its own sampling seed, each ending at EOS or the chat
     template's end of turn (stop_ids). The seam for a faster engine.
  2. rewards: rl_reward_scale (α) × the reward function's score, per completion (rewards.py).
  3. one forward with grad: per-token log-probs of the completions through lm_head.py's fused head path, the
     reference's (no grad, for the KL) and, for PPO, the value head's V(s_t) on the same hidden states.
  4. advantages, per completion token: group-relative (r − mean_g r; 'group_std' divides by the group's std,
     'loo' subtracts the mean of the other G−1), or 'ppo': GAE(γ, λ) over the value head's values with the
     sequence reward at the completion's last token (rl_kl_in_reward: plus −β_kl·(logp − ref) at every token, and no
     k3 below). rl_whiten: then mean 0 / std 1 over the micro-batch's tokens.
  5. loss per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β_kl·k3, ρ = exp(logp − logp_old) per token, or per
     completion with rl_importance_sampling_level='sequence' (GSPO: exp of the mean log-ratio), k3 = exp(ref − logp)
     − (ref − logp) − 1 (× ρ with rl_use_bias_correction_kl), plus for PPO ½·max((V − R)², (V_clipped − R)²).
     logp_old: the same forward detached on a rollout's first update (ρ = 1, so the gradient is REINFORCE's), the
     stored one on the rl_epochs − 1 updates that replay the same rollouts (their prompts drawn by the trainer are
     then skipped). rl_mask_truncated_completions: a completion without EOS (or end of turn) contributes no
     token (DAPO).
Normalization (rl_loss_norm, TRL's names): 'bnpo' the token-level mean over the micro-batch's completion tokens (the
default); 'dapo' the token-level mean over the whole generation batch (every micro-step of the update, every rank);
'grpo' the mean over each completion's tokens, then over completions; 'dr_grpo' the token sum / (completions ×
rl_max_new_tokens). The losses come back one per prompt (the example the trainer's evals weight and its data cursor
count), scaled so that their plain mean, what the trainer takes, is that normalization.
Generation batch ('dapo', rl_advantage='batch_std'): as TRL, the update's rollouts are all made before the first of
its micro-steps trains (the trainer draws the update's micro-batches first: ctx.update_batches), so that the token
count and the reward std of the whole batch, over the ranks, are known to every micro-step.
Evaluation (no grad, bipost.estimate): one greedy completion per held-out prompt; loss = −reward, so f*, maxright
and the ideal distance see the negative mean held-out reward. The first SAMPLES of them (rank 0's held-out prompts,
in order) are what a user reads: write_samples appends them to out_dir/rl_samples.jsonl after each eval.
"""
import json
import time

import torch

import lm_head  # the shared head path (log-probs through the LM head); objectives.py imports this file, not the reverse
import packing  # padding-free packed rows for the loss forward (generation stays padded)
import rewards as reward_functions

ADVANTAGES = ('group', 'group_std', 'batch_std', 'loo', 'ppo')
LOSS_NORMS = ('bnpo', 'dapo', 'grpo', 'dr_grpo')
IMPORTANCE_LEVELS = ('token', 'sequence')


FIELDS = {'verify_number': 'answer', 'exact': 'answer', 'normalized': 'answer', 'format': 'format', 'math': 'answer',
          'ifeval': None}  # ifeval: two record shapes, checked by ifeval_checks.check_records
SAMPLES = 4  # greedy held-out completions per eval in out_dir/rl_samples.jsonl
SAMPLES_FILE = 'rl_samples.jsonl'


def settings(config, meta, rank, device, synced_gpus, splits):
    """What the RL objective adds to ctx: the rl_* settings, the reward function, the decoder and the rollout state.
    splits: the train and the val prompt split. Raises ValueError (one line, with the fix) on bad settings or prompt
    records that lack the verifier's field."""
    for key, allowed in (('rl_advantage', ADVANTAGES), ('rl_loss_norm', LOSS_NORMS),
                         ('rl_importance_sampling_level', IMPORTANCE_LEVELS)):
        if config[key] not in allowed:
            raise ValueError(f"{key}={config[key]!r} is not one of {allowed}")
    if config['rl_group'] < (1 if config['rl_advantage'] == 'ppo' else 2):
        raise ValueError(f"rl_group={config['rl_group']}: group-relative advantages need >= 2 completions per prompt "
                         f"(4-16 is usual); rl_advantage='ppo' works with 1")
    if not 0 <= config['rl_overlong_cache'] < config['rl_max_new_tokens']:
        raise ValueError(f"rl_overlong_cache={config['rl_overlong_cache']} must be in [0, rl_max_new_tokens="
                         f"{config['rl_max_new_tokens']}): the last tokens before the budget where the reward falls")
    if config['rl_epsilon_high'] < 0:
        raise ValueError(f"rl_epsilon_high={config['rl_epsilon_high']} must be >= 0 (0: the same as rl_clip; DAPO: 0.28)")
    if config['rl_max_new_tokens'] < 1 or config['rl_epochs'] < 1 or not 0 <= config['rl_ema'] < 1:
        raise ValueError(f"rl_max_new_tokens={config['rl_max_new_tokens']} and rl_epochs={config['rl_epochs']} must be "
                         f">= 1, rl_ema={config['rl_ema']} in [0, 1)")
    if not (config['rl_temperature'] > 0 and 0 < config['rl_top_p'] <= 1):
        raise ValueError(f"rl_temperature={config['rl_temperature']} must be > 0 and rl_top_p={config['rl_top_p']} in (0, 1]")
    if config['rl_kl'] > 0 and config['reference_logps'] == 'precompute':
        raise ValueError("rl_kl > 0 needs the live reference beside the policy, which reference_logps='precompute' frees: "
                         "set reference_logps='live', or rl_kl=0")
    if config['rl_ema'] and (config['rl_kl'] == 0 or config['deepspeed'] and config['zero_stage'] == 3):
        raise ValueError(f"rl_ema={config['rl_ema']} updates the reference of the KL penalty in place: it needs rl_kl > 0 "
                         f"and whole (not ZeRO-3-partitioned) parameters; set rl_ema=0, or zero_stage <= 2")
    if config['rl_reward_norm'] and config['rl_advantage'] == 'batch_std':
        raise ValueError("rl_reward_norm=True already scales rewards by their running std; rl_advantage='batch_std' "
                         "would divide by the raw batch's std too: use one of them")
    if config['rl_kl_in_reward'] and (config['rl_advantage'] != 'ppo' or config['rl_kl'] <= 0):
        raise ValueError(f"rl_kl_in_reward=True puts rl_kl·KL into PPO's per-token rewards: it needs rl_advantage='ppo' "
                         f"(got {config['rl_advantage']!r}) and rl_kl > 0 (got {config['rl_kl']})")
    if config.get('lora_rank', 0) and (config['rl_ema'] or config['rl_advantage'] == 'ppo'):
        raise ValueError(f"lora_rank={config['lora_rank']} trains the adapters alone and its reference is the policy with "
                         f"them off: rl_ema (it would move the base) and rl_advantage='ppo' (its value head is no "
                         f"adapter) are not supported with LoRA; set rl_ema=0 and a group advantage, or lora_rank=0")
    field = FIELDS.get(config['rl_reward'])
    for split in splits:
        missing = next((i for i, record in enumerate(split.extra) if field and field not in record), None)
        if missing is not None:
            raise ValueError(f"{split.path}_extra.jsonl: record {missing + 1} has no \"{field}\" field, which "
                             f"rl_reward={config['rl_reward']!r} reads: add it to the prompt records (data/prepare.py "
                             f"keeps every field besides the prompt) and prepare the split again")
        if config['rl_reward'] == 'ifeval':
            import ifeval_checks
            ifeval_checks.check_records(split.extra, f'{split.path}_extra.jsonl')
    return dict({k: v for k, v in config.items() if k.startswith('rl_')},
                reward=reward_functions.load(config['rl_reward'], device),
                verifier=config['rl_reward'] in FIELDS,  # accuracy = share of verified answers
                decode=reward_functions.decoder(meta), eos_id=meta['eos_id'], pad_id=meta['pad_id'], rank=rank,
                stop_ids=stop_ids(meta),
                synced_gpus=synced_gpus, gradient_accumulation_steps=config['gradient_accumulation_steps'],
                rl_replay={'calls': 0, 'rollouts': []}, eval_samples=[], val_split_name=splits[1].name,
                rl_reward_stats=torch.zeros(3, dtype=torch.float64) if config['rl_reward_norm'] else None)


def stop_ids(meta):
    """The ids a completion ends at: EOS, and the chat template's end of turn (<|im_end|>, <|eot_id|>) when that is
    another token: a chat model trained on bipost's data ends its answer there (data/prepare.py), and what the template
    writes after it would otherwise be generated, scored and trained as part of the answer."""
    end_of_turn = meta.get('tokenizer_identity', {}).get('end_of_turn_id')  # absent: data prepared before it existed
    return [meta['eos_id']] + ([end_of_turn] if end_of_turn is not None and end_of_turn != meta['eos_id'] else [])


# ---- the math, pure functions ----

def group_advantages(rewards, group, mode, eps=1e-4, batch_std=None):
    """rewards [N] (N = prompts × group, a prompt's completions adjacent) -> advantages [N]. 'group': r − mean of
    the group; 'group_std': that / (std + eps), the unbiased std as TRL; 'batch_std': that / (batch_std + eps), the
    unbiased std of the whole generation batch's rewards (TRL's scale_rewards='batch'); 'loo': r − mean of the
    other G − 1."""
    r = rewards.view(-1, group)
    advantages = r - r.mean(1, keepdim=True)
    if mode == 'loo':  # r_i − (Σr − r_i)/(G−1) = G/(G−1)·(r_i − mean)
        advantages = advantages * group / (group - 1)
    elif mode == 'group_std':
        advantages = advantages / (r.std(1, keepdim=True) + eps)
    elif mode == 'batch_std':
        advantages = advantages / (batch_std + eps)
    return advantages.reshape(-1)


def whiten(values, mask, eps=1e-8):
    """Mean 0, std 1 over the masked entries (the batch's completion tokens); 0 elsewhere."""
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / n
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over each row's masked tokens (contiguous: one completion), right to left:
    δ_t = r_t + γ·V_next − V_t, A_t = δ_t + γλ·A_next, the next state after the last token worth 0. rewards, values,
    mask [N, T]. Returns advantages and returns (A + V), both 0 outside the mask."""
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m, advantage, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
    return advantages, torch.where(mask, advantages + values, 0.0)


def overlong_punishment(lengths, max_new_tokens, cache):
    """DAPO's soft overlong punishment (TRL's get_soft_overlong_punishment): 0 for a completion of up to
    max_new_tokens − cache tokens, then falling linearly to −1 at max_new_tokens."""
    return ((max_new_tokens - cache - lengths.float()) / cache).clamp(-1, 0)


def token_rewards(rewards, mask, logps=None, reference_logps=None, beta=0.0):
    """PPO's per-token rewards [N, T]: the sequence reward at each completion's last token and, with the KL in the
    reward (InstructGPT, OpenRLHF), −β·(log π − log π_ref) at every completion token (the sampled tokens' log-ratio,
    an unbiased estimate of the KL's contribution); 0 outside the mask."""
    last = mask.cumsum(1) == mask.sum(1, keepdim=True)
    per_token = torch.where(mask & last, rewards[:, None], 0.0)
    if logps is not None:
        per_token = per_token - beta * torch.where(mask, logps - reference_logps, 0.0)
    return per_token


def normalize_rewards(rewards, stats, eps=1e-8):
    """rl_reward_norm: (r − mean) / (std + eps) with the running mean and std of every training reward so far, this
    batch's included, over all ranks (each batch's count, Σr and Σr² are summed over ranks, so the moments agree
    everywhere). stats: float64 [count, Σr, Σr²], updated in place (checkpointed: a resumed run continues them)."""
    count = torch.tensor(float(rewards.numel()), device=rewards.device)
    batch = torch.stack([count, rewards.sum(), (rewards ** 2).sum()]).double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(batch)
    stats += batch.cpu()
    mean = stats[1] / stats[0]
    std = (stats[2] / stats[0] - mean ** 2).clamp(min=0).sqrt()
    return ((rewards.double() - mean.to(rewards.device)) / (std.to(rewards.device) + eps)).float()


def k3(logps, reference_logps):
    """Schulman's unbiased, always >= 0 estimator of KL(π ‖ π_ref) per sampled token: e^x − x − 1, x = ref − logp."""
    x = reference_logps - logps
    return torch.exp(x) - x - 1


def sequence_mean(logps, mask):
    """[N, T] -> [N, 1]: the mean over each completion's masked tokens. GSPO's importance ratio is exp of the mean
    log-ratio, i.e. clipped_surrogate on these (the geometric mean of the token ratios, one per completion)."""
    return (logps * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)


def clipped_surrogate(logps, old_logps, advantages, clip):
    """PPO's per-token loss −min(ρA, clip(ρ, 1−ε, 1+ε_high)A), ρ = exp(logp − old), and where the clip is active.
    clip: ε, or (ε, ε_high) for DAPO's clip-higher (TRL's epsilon, epsilon_high)."""
    low, high = clip if isinstance(clip, tuple) else (clip, clip)
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - low, 1 + high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def normalize(token_losses, mask, norm, max_new_tokens, batch_tokens=None, shares=1):
    """Per-completion losses whose mean over completions is the batch loss under TRL's normalization `norm`.
    'dapo': the token sum over batch_tokens, the generation batch's token count (every micro-step of the update, every
    rank), times shares = micro-steps × ranks, which the trainer's gradient averaging divides by again."""
    sums, lengths = (token_losses * mask).sum(1), mask.sum(1).clamp(min=1)
    if norm == 'grpo':
        return sums / lengths
    if norm == 'dr_grpo':
        return sums / max_new_tokens
    if norm == 'dapo':
        return sums * len(sums) * shares / batch_tokens.clamp(min=1)
    return sums * len(sums) / mask.sum().clamp(min=1)  # bnpo: Σ over the micro-batch's tokens / its tokens, spread


# ---- rollouts ----

def sampling_seed(ctx):
    """A fresh seed per rollout: a draw from the RNG every rank holds in the same (checkpointed) state, so that a
    resumed run samples the same, combined with the rank, so that the ranks sample different completions."""
    return int(torch.randint(2 ** 31, ())) * 65536 + ctx.rank


@torch.no_grad()
def rollout(model, prompts, prompt_mask, ctx, group, greedy):
    """prompts [B, P] left-padded, prompt_mask [B, P] -> completions [B·group, T] (a prompt's group adjacent; pad after
    each one's end), their lengths (the EOS counted when it was generated) and the seconds it took. The seam where
    a faster rollout engine (vLLM, SGLang) would plug in, with the same inputs and outputs."""
    from transformers import GenerationConfig
    sampling = {} if greedy else dict(temperature=ctx.rl_temperature, top_p=ctx.rl_top_p, top_k=0)  # the policy's own
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=ctx.rl_max_new_tokens, eos_token_id=ctx.stop_ids,
                              pad_token_id=ctx.pad_id, use_cache=True, **sampling)
    ids, mask = prompts.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0)
    seed = None if greedy else sampling_seed(ctx)  # drawn before the fork, so that the shared RNG moves on
    training, start = model.training, time.time()
    model.eval()
    with torch.random.fork_rng(devices=[ids.device] if ids.is_cuda else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=ctx.synced_gpus)
    model.train(training)
    completions = out[:, ids.shape[1]:]
    ends = stopped(completions, ctx)
    lengths = torch.where(ends.any(1), ends.int().argmax(1) + 1, completions.shape[1])
    return completions, lengths, time.time() - start


def stopped(completions, ctx):
    """[N, T] True where a completion holds one of ctx.stop_ids."""
    return torch.isin(completions, torch.tensor(ctx.stop_ids, device=completions.device))


def sequences(prompts, prompt_mask, completions, lengths, group, pad_id):
    """Rows prompt + completion, right-padded, with the completion as response_mask: what Split.batch makes for SFT."""
    prompt_lengths = prompt_mask.sum(1).repeat_interleave(group)
    total = prompt_lengths + lengths
    input_ids = torch.full((len(total), int(total.max())), pad_id, dtype=prompts.dtype, device=prompts.device)
    positions = torch.arange(input_ids.shape[1], device=prompts.device)
    for i, (p, n) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist())):
        input_ids[i, :p + n] = torch.cat([prompts[i // group, prompts.shape[1] - p:], completions[i, :n]])
    return {'input_ids': input_ids, 'attention_mask': (positions < total[:, None]).long(),
            'response_mask': (positions >= prompt_lengths[:, None]) & (positions < total[:, None])}


def score(batch, completions, lengths, group, ctx):
    """α·score per completion [N], and the raw scores; the reward function sees text and the record's fields."""
    prompt_texts = [ctx.decode(p[m.bool()].tolist()) for p, m in zip(batch['input_ids'], batch['attention_mask'])]
    texts = [ctx.decode(c[:n].tolist()) for c, n in zip(completions, lengths.tolist())]
    keys = sorted({k for record in batch['extra'] for k in record})
    columns = {k: [record.get(k) for record in batch['extra'] for _ in range(group)] for k in keys}
    scores = ctx.reward(prompts=[p for p in prompt_texts for _ in range(group)], completions=texts, **columns)
    scores = torch.as_tensor(scores, dtype=torch.float32, device=completions.device).reshape(-1)
    if scores.numel() != len(texts) or not torch.isfinite(scores).all():
        raise ValueError(f"rl_reward={ctx.rl_reward!r} returned {scores.numel()} scores (non-finite: "
                         f"{int((~torch.isfinite(scores)).sum())}) for {len(texts)} completions: it must return one "
                         f"finite float per completion")
    return scores * ctx.rl_reward_scale, scores


def make_rollout(model, batch, ctx, group, greedy):
    """Everything a loss needs from one batch of prompts, none of it with grad."""
    completions, lengths, seconds = rollout(model, batch['input_ids'], batch['attention_mask'], ctx, group, greedy)
    rows = sequences(batch['input_ids'], batch['attention_mask'], completions, lengths, group, ctx.pad_id)
    rewards, scores = score(batch, completions, lengths, group, ctx)
    if ctx.rl_overlong_cache:  # added to the score, so that α scales it with the verdict (TRL: reward weight 1 each)
        rewards = rewards + ctx.rl_reward_scale * overlong_punishment(lengths, ctx.rl_max_new_tokens,
                                                                      ctx.rl_overlong_cache)
    reference_logps = None
    if getattr(ctx, 'reference', None) is not None:
        with torch.no_grad():
            reference_logps, _ = lm_head.response_logprobs(ctx.reference, rows, ctx)
    return {'rows': rows, 'group': group, 'rewards': rewards, 'scores': scores, 'lengths': lengths,
            'truncated': ~stopped(completions, ctx).any(1),  # hit rl_max_new_tokens without EOS (or end of turn)
            'reference_logps': reference_logps, 'gen_tokens_per_s': float(lengths.sum()) / max(seconds, 1e-9)}


def generation_batch(rolls, ctx):
    """TRL's generation batch: the rollouts of every micro-step of the update on every rank, made before the first of
    them trains. Stores in each rollout the batch's loss-token count ('dapo') and reward std ('batch_std'), summed and
    gathered over the ranks, and the number of shares (micro-steps × ranks) the trainer averages the gradient over."""
    rewards = torch.cat([roll['rewards'] for roll in rolls])
    tokens = sum(float((roll['lengths'] * kept(roll, ctx)).sum()) for roll in rolls)
    tokens, world = torch.tensor(tokens, device=rewards.device), 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        gathered = [torch.empty_like(rewards) for _ in range(world)]
        torch.distributed.all_gather(gathered, rewards)
        torch.distributed.all_reduce(tokens)
        rewards = torch.cat(gathered)
    for roll in rolls:
        roll.update(batch_tokens=tokens, batch_std=rewards.std(), shares=len(rolls) * world)
    return rolls


def kept(roll, ctx):
    """1 for the completions that get a loss, 0 for the truncated ones under rl_mask_truncated_completions."""
    return (~roll['truncated']).float() if ctx.rl_mask_truncated_completions else torch.ones_like(roll['rewards'])


# ---- the objective ----

def forward(model, rows, ctx, values):
    """Per-token log-probs [N, L−1] of the completions (0 elsewhere), their mask, and V(s_t) when values: the value
    head reads the same final hidden state that scores token t."""
    body, head = lm_head.body_and_head(model)
    hidden, layout = packing.scoring_hidden(body, rows, getattr(ctx, 'packing', False))  # packed: [S, H] (packing.py)
    targets, mask = rows['input_ids'][:, 1:], rows['response_mask'][:, 1:].bool()
    logps = head.logprobs(hidden, packing.gather(targets, layout), packing.gather(mask, layout),
                          fused=None if ctx.fused_kernels else False)
    values = packing.spread(model.value_head(hidden).squeeze(-1).float(), layout, mask.shape) if values else None
    return packing.spread(logps, layout, mask.shape), mask, values


def per_prompt(values, group):
    return values.view(-1, group).mean(1)


def loss(model, roll, ctx):
    """Per-prompt losses and metrics of one rollout batch; on its first call, stores the old log-probs and the
    advantages in roll (its replays reuse them)."""
    ppo, group = ctx.rl_advantage == 'ppo', roll['group']
    logps, mask, values = forward(model, roll['rows'], ctx, ppo)
    mask = mask & kept(roll, ctx).bool()[:, None]  # DAPO's overlong filtering: a truncated completion gets no loss
    if 'old_logps' not in roll:  # the rollout's own update: the policy that sampled is this very forward
        roll['old_logps'] = logps.detach()
        rewards = roll['rewards']  # (logged as they are; the advantages may see them normalized)
        if getattr(ctx, 'rl_reward_stats', None) is not None:
            rewards = normalize_rewards(rewards, ctx.rl_reward_stats)
        if ppo:
            roll['old_values'] = values.detach()
            kl = (roll['old_logps'], roll['reference_logps'], ctx.rl_kl) if getattr(ctx, 'rl_kl_in_reward', False) else ()
            advantages, roll['returns'] = gae(token_rewards(rewards, mask, *kl), roll['old_values'], mask,
                                              ctx.rl_gamma, ctx.rl_lam)
        else:
            advantages = group_advantages(rewards, group, ctx.rl_advantage,
                                          batch_std=roll.get('batch_std'))[:, None] * mask
        roll['advantages'] = whiten(advantages, mask) if ctx.rl_whiten else advantages
    new, old = logps, roll['old_logps']
    if ctx.rl_importance_sampling_level == 'sequence':
        new, old = sequence_mean(logps, mask), sequence_mean(old, mask)
    clip = (ctx.rl_clip, ctx.rl_epsilon_high or ctx.rl_clip)
    token_losses, clipped = clipped_surrogate(new, old, roll['advantages'], clip)
    metrics = {}
    if roll['reference_logps'] is not None:
        kl = k3(logps, roll['reference_logps']) * mask
        if ctx.rl_use_bias_correction_kl:  # TRL: the KL of samples from π_old, reweighted to π (gradient through ρ too)
            kl = kl * torch.exp(new - old)
        if not getattr(ctx, 'rl_kl_in_reward', False):  # (in the reward, the KL is already in the advantages)
            token_losses = token_losses + ctx.rl_kl * kl
        metrics['kl'] = per_prompt(kl.detach().sum(1), group) / per_prompt(mask.sum(1).float(), group)
    if ppo:
        v_clipped = roll['old_values'] + (values - roll['old_values']).clamp(-ctx.rl_clip, ctx.rl_clip)
        value_losses = 0.5 * torch.maximum((values - roll['returns']) ** 2, (v_clipped - roll['returns']) ** 2) * mask
        token_losses = token_losses + value_losses
        metrics['value_loss'] = per_prompt(value_losses.detach().sum(1) / mask.sum(1).clamp(min=1), group)
    losses = per_prompt(normalize(token_losses * mask, mask, ctx.rl_loss_norm, ctx.rl_max_new_tokens,
                                  roll.get('batch_tokens'), roll.get('shares', 1)), group)
    tokens = per_prompt(mask.sum(1).float(), group)
    rewards = roll['rewards'].view(-1, group)
    metrics.update({
        'loss': -rewards.mean(1),  # the objective's value (its logs, maxright, f*): −mean reward of the samples
        'surrogate': losses.detach(), 'reward': rewards.mean(1), 'reward_std': rewards.std(1, unbiased=False),
        'zero_std': (rewards.max(1).values == rewards.min(1).values).float(),
        'clip_fraction': per_prompt((clipped & mask).sum(1).float(), group) / tokens,
        'length': per_prompt(roll['lengths'].float(), group),
        'gen_tokens_per_s': torch.full_like(tokens, roll['gen_tokens_per_s'])})
    if ctx.verifier:
        metrics['accuracy'] = per_prompt((roll['scores'] > 0).float(), group)
    return losses, metrics


def evaluate(model, batch, ctx):
    """One greedy completion per prompt: loss = −reward, with the reward, accuracy, length, KL and tokens/s."""
    roll = make_rollout(model, batch, ctx, 1, greedy=True)
    if ctx.rank == 0 and batch.get('split') == getattr(ctx, 'val_split_name', ''):  # (a bare ctx keeps none)
        keep_samples(batch, roll, ctx)
    metrics = {'reward': roll['rewards'], 'length': roll['lengths'].float(),
               'gen_tokens_per_s': torch.full_like(roll['rewards'], roll['gen_tokens_per_s'])}
    if ctx.verifier:
        metrics['accuracy'] = (roll['scores'] > 0).float()
    if roll['reference_logps'] is not None:
        logps, mask, _ = forward(model, roll['rows'], ctx, False)
        metrics['kl'] = (k3(logps, roll['reference_logps']) * mask).sum(1) / mask.sum(1)
    return -roll['rewards'], metrics


def keep_samples(batch, roll, ctx):
    """evaluate(): the eval's first SAMPLES prompts as text, with their greedy completion and reward (α·score). A rank
    out of held-out prompts pads its last batch with prompt 0 again: kept once."""
    for i, index in enumerate(batch['index'].tolist()):
        if len(ctx.eval_samples) == SAMPLES or any(s['index'] == index for s in ctx.eval_samples):
            continue
        prompt = batch['input_ids'][i][batch['attention_mask'][i].bool()]
        completion = roll['rows']['input_ids'][i][roll['rows']['response_mask'][i]]
        ctx.eval_samples.append({'index': index, 'prompt': ctx.decode(prompt.tolist()),
                                 'completion': ctx.decode(completion.tolist()), 'reward': float(roll['rewards'][i])})


def write_samples(ctx, path, iter_num):
    """After an eval, on rank 0: its samples appended to path (out_dir/rl_samples.jsonl) as JSON lines
    {"iter", "index" (in the val split), "prompt", "completion", "reward"}; a resume drops those past its checkpoint,
    as for metrics.jsonl."""
    with open(path, 'a') as f:
        for sample in ctx.eval_samples:
            f.write(json.dumps({'iter': iter_num, **sample}) + '\n')
    ctx.eval_samples = []


def objective(model, batch, ctx):
    """objectives.OBJECTIVES['rl']. Under no_grad (bipost.estimate: evals, maxright's estimates) a greedy evaluation;
    else one RL micro-step: fresh rollouts, or with rl_epochs > 1 a replay of the last update's rollouts (one per
    micro-step, in order) for rl_epochs − 1 updates."""
    if not torch.is_grad_enabled():
        return evaluate(model, batch, ctx)
    replay, steps = ctx.rl_replay, ctx.gradient_accumulation_steps
    call = replay['calls'] % (steps * ctx.rl_epochs)
    replay['calls'] += 1
    if call >= steps:  # a replayed update: the trainer's prompts are skipped, the stored rollouts reused
        return loss(model, replay['rollouts'][call % steps], ctx)
    if ctx.rl_loss_norm == 'dapo' or ctx.rl_advantage == 'batch_std':  # the whole update's rollouts first, as TRL
        if call == 0:  # the trainer drew the update's micro-batches before the first (bipost.py: ctx.update_batches)
            replay['rollouts'] = generation_batch([make_rollout(model, b, ctx, ctx.rl_group, greedy=False)
                                                   for b in ctx.update_batches], ctx)
        return loss(model, replay['rollouts'][call], ctx)
    roll = make_rollout(model, batch, ctx, ctx.rl_group, greedy=False)
    if ctx.rl_epochs > 1:
        replay['rollouts'] = ([] if call == 0 else replay['rollouts']) + [roll]
    return loss(model, roll, ctx)


@torch.no_grad()
def update_reference(reference, policy, alpha):
    """EMA reference (rl_ema = α > 0), after each optimizer step: π_ref ← α·π_ref + (1−α)·π, parameter by parameter
    (the policy's value head has no counterpart)."""
    params = dict(policy.named_parameters())
    for name, p in reference.named_parameters():
        p.lerp_(params[name].detach().to(p.dtype), 1 - alpha)


def value_head(model, state=None):
    """PPO's V(s) = w·h + b on the policy's final hidden states; zero-initialized (V = 0 at first, the same on
    every rank without a broadcast), or a plain-torch checkpoint's (state; under DeepSpeed the engine loads it)."""
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    if state is not None:
        head.load_state_dict({k[len('value_head.'):]: v for k, v in state['model'].items() if k.startswith('value_head.')})
    return head
